"""PaliGemma's checkpoints: options (LoadOptions), model_dir (a directory or a Hub id in the local cache), keys (every
writer's names), build (the model on meta, its formats, dtype and kernels), load (load_model -> LoadedModel,
load_hf_model), transformers_model (transformers' own class through the same stream), convert, synth."""
