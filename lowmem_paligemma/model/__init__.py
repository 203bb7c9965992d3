"""What PaliGemma is: config (dataclasses, presets, from_hf), siglip, gemma (1 and 2 by flags), paligemma (the whole,
make_attn_mask), processor (image and prompt to tensors), text_stream (ids to streamed text), sampling (next-token
choice, SamplingOptions), generate (prefill, decode steps, batches), tasks (boxes, masks). Imports nothing above
formats/ (the weight layers)."""
