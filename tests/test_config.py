"""Config parsing (Hub config.json, defaults, traps) and full-size presets on `meta`."""

import json

import pytest
import torch

from lowmem_paligemma.config import PRESETS, ConfigError, from_hf, load_config, tiny
from lowmem_paligemma.paligemma import PaliGemmaForConditionalGeneration
from lowmem_paligemma.pretrained import LM_HEAD, normalize_key

# google/paligemma-3b-pt-224 and google/paligemma2-3b-pt-224 config.json as the Hub ships them
# (docs/model.md, "Config traps").
PG1_HUB = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1, "hidden_size": 2048,
    "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                    "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0",
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
    "vocab_size": 257216,
}  # fmt: skip
PG2_HUB = {
    "_vocab_size": 257152, "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2,
    "eos_token_id": 1, "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma",
    "num_hidden_layers": 26, "pad_token_id": 0, "projection_dim": 2304,
    "text_config": {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
                    "cache_implementation": "hybrid", "eos_token_id": [1, 107], "final_logit_softcapping": 30.0,
                    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
                    "intermediate_size": 9216, "model_type": "gemma2", "num_hidden_layers": 26, "num_image_tokens": 256,
                    "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "torch_dtype": "bfloat16", "vocab_size": 257216},
    "torch_dtype": "bfloat16", "transformers_version": "4.47.0",
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                      "num_positions": 256, "patch_size": 14, "projection_dim": 2304, "torch_dtype": "bfloat16",
                      "vision_use_head": False},
}  # fmt: skip

# Parameter counts from docs/model.md, "Configurations" (meta-device instantiation of transformers' class).
PARAMS = {
    "paligemma-3b-224": 2_923_466_480, "paligemma-3b-448": 2_924_351_216, "paligemma-3b-896": 2_927_890_160,
    "paligemma2-3b-224": 3_032_242_416, "paligemma2-3b-448": 3_033_127_152, "paligemma2-3b-896": 3_036_666_096,
    "paligemma2-10b-224": 9_662_638_832, "paligemma2-28b-224": 27_650_487_024,
}  # fmt: skip


def test_hub_configs_parse_to_presets():
    assert from_hf(PG1_HUB) == PRESETS["paligemma-3b-224"]
    assert from_hf(PG2_HUB) == PRESETS["paligemma2-3b-224"]
    pg2_448 = json.loads(json.dumps(PG2_HUB))
    pg2_448["vision_config"] |= {"image_size": 448, "num_image_tokens": 1024}  # num_positions 256 stays (bogus)
    assert from_hf(pg2_448) == PRESETS["paligemma2-3b-448"]


def test_gemma2_flags_and_layer_types():
    cfg = PRESETS["paligemma2-28b-224"].text
    assert cfg.post_norms and cfg.attn_logit_softcap == 50.0 and cfg.final_logit_softcap == 30.0
    assert cfg.attn_scale == 144**-0.5 and cfg.head_dim == 128
    assert [cfg.is_sliding(i) for i in range(4)] == [True, False, True, False]
    pg1 = PRESETS["paligemma-3b-224"].text
    assert not pg1.post_norms and pg1.attn_scale == 256**-0.5 and not pg1.is_sliding(0)
    explicit = json.loads(json.dumps(PG2_HUB))
    explicit["text_config"]["layer_types"] = ["full_attention"] * 26
    explicit["text_config"]["final_logit_softcapping"] = None
    parsed = from_hf(explicit).text
    assert parsed.sliding_layers == () and parsed.final_logit_softcap is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_hub_json(name):
    assert from_hf(json.loads(json.dumps(PRESETS[name].to_hf()))) == PRESETS[name]


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"text_config": {"model_type": "llama"}}, "not gemma or gemma2"),
        ({"text_config": {"model_type": "gemma", "num_attention_heads": 8, "num_key_value_heads": 3}}, "multiple"),
        ({"vision_config": {"model_type": "siglip_vision_model", "hidden_size": "big"}}, "positive integer"),
        ({"model_type": "llava"}, "not paligemma"),
        ({"projection_dim": 999}, "differs"),
    ],
)
def test_bad_configs_raise(patch, message):
    with pytest.raises(ConfigError, match=message):
        from_hf({**PG1_HUB, **patch})


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def _hf_meta_shapes(cfg):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(PaliGemmaConfig(**cfg.to_hf()))
    shapes = {normalize_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.pop(LM_HEAD)  # tied: the embedding
    return shapes


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_on_meta_like_transformers(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)  # zero bytes allocated
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _hf_meta_shapes(cfg)
    if name in PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_tiny_configs_are_small_and_exercise_gemma2():
    cfg = tiny(gemma2=True)
    assert cfg.num_image_tokens == 16 and cfg.image_token_index < cfg.text.vocab_size
    assert cfg.text.sliding_window and cfg.text.query_pre_attn_scalar != cfg.text.head_dim
