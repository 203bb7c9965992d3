"""Config parsing (Hub config.json, defaults, traps) and full-size presets on `meta`."""

import json

import pytest
import torch

from lowmem_paligemma.model.config import PRESETS, ConfigError, from_hf, load_config, tiny
from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration
from lowmem_paligemma.pretrained.keys import LM_HEAD, normalize_key

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


# --- every field the model reads is checked: one ConfigError naming the field and the value -----------------

_SIZES = {
    "text_config": ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "query_pre_attn_scalar"],
    "vision_config": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "num_channels"],
}  # fmt: skip
_NUMBERS = {
    "text_config": [
        "rms_norm_eps",
        "rope_theta",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "sliding_window",
    ],
    "vision_config": ["layer_norm_eps"],
}
_BAD = [None, 0, -1, "8", True, 1.5, 10**12, [], {}, float("inf")]


def _patched(where: str | None, key: str, value) -> dict:
    d = json.loads(json.dumps(PG2_HUB))
    (d[where] if where else d)[key] = value
    return d


def _cases():
    for where, keys in _SIZES.items():
        for key in keys:
            for value in _BAD:
                yield where, key, value
    for where, keys in _NUMBERS.items():
        for key in keys:
            for value in _BAD:
                # null switches a soft-cap or the sliding window off (Gemma2Config takes None there).
                if value is None and key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
                    continue
                if isinstance(value, float) and value == 1.5 or value == 10**12 and key != "sliding_window":
                    continue  # a valid positive number
                yield where, key, value
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        for value in (-1, 257216, "1", True, 1.5, [None]):  # 257216 = vocab_size: outside the vocabulary
            yield None, key, value
    yield "text_config", "eos_token_id", [1, 300000]
    for value in (None, -1, "257152", True, 1.5):
        yield None, "image_token_index", value
    for where, key in [("text_config", "model_type"), ("vision_config", "model_type"), (None, "model_type"),
                       ("text_config", "hidden_activation"), ("vision_config", "hidden_act")]:  # fmt: skip
        for value in (None, 1, "llama", ["gemma2"]):
            yield where, key, value
    yield None, "projection_dim", None
    yield "text_config", "layer_types", ["sliding_attention"] * 25 + ["local"]
    yield "text_config", "layer_types", ["full_attention"] * 3
    yield "text_config", "rope_parameters", {"rope_type": "linear", "factor": 2.0}
    yield "text_config", "rope_parameters", {"rope_theta": -5.0}
    yield "text_config", "rope_parameters", "default"
    yield "text_config", "rope_scaling", {"type": "linear", "factor": 2.0}
    yield "vision_config", "vision_use_head", True


@pytest.mark.parametrize("where, key, value", list(_cases()), ids=repr)
def test_every_bad_field_is_one_config_error_naming_it(where, key, value):
    with pytest.raises(ConfigError) as err:
        from_hf(_patched(where, key, value))
    message = str(err.value)
    assert key.split("_")[0] in message and "\n" not in message, message
    shown = [json.dumps(v) for v in (value if isinstance(value, list) and key.endswith("_id") else [value])]
    assert any(v in message for v in shown) or key in ("layer_types", "rope_parameters", "rope_scaling"), message


@pytest.mark.parametrize(
    "patch, message",
    [
        (("text_config", "num_key_value_heads", 3), "num_attention_heads 8 is not a multiple of num_key_value_heads 3"),
        (("text_config", "head_dim", 255), "head_dim must be even"),
        (("vision_config", "num_attention_heads", 7), "hidden_size 1152 is not divisible by num_attention_heads 7"),
        (("vision_config", "patch_size", 15), "image_size 224 is not a multiple of patch_size 15"),
        (("vision_config", "num_channels", 1), "num_channels must be 3"),
        ((None, "text_config", None), "needs text_config and vision_config objects"),
        ((None, "vision_config", []), "needs text_config and vision_config objects"),
    ],
)
def test_fields_that_must_agree(patch, message):
    with pytest.raises(ConfigError, match=message):
        from_hf(_patched(*patch))


def test_nulls_that_mean_the_default_or_off():
    cfg = from_hf(PG2_HUB)
    for key, field, want in [
        ("sliding_window", "sliding_window", None),
        ("attn_logit_softcapping", "attn_logit_softcap", None),
        ("final_logit_softcapping", "final_logit_softcap", None),
        ("layer_types", "sliding_layers", cfg.text.sliding_layers),
        ("rope_parameters", "rope_theta", 10000.0),
    ]:
        assert getattr(from_hf(_patched("text_config", key, None)).text, field) == want, key
    for key, want in [("pad_token_id", 0), ("bos_token_id", 2)]:
        assert getattr(from_hf(_patched(None, key, None)), key) == want
    assert from_hf(_patched(None, "eos_token_id", None)).eos_token_ids == (1, 107)  # text_config's list
    no_eos = _patched(None, "eos_token_id", None)
    no_eos["text_config"]["eos_token_id"] = None
    assert from_hf(no_eos).eos_token_ids == (1,)  # GemmaConfig's default


def test_context_length_and_image_token_limits():
    assert from_hf(PG1_HUB).text.max_position_embeddings == 8192  # the Gemma class default; Hub configs omit it
    assert from_hf(_patched("text_config", "max_position_embeddings", 4096)).text.max_position_embeddings == 4096
    # An <image> id at or past vocab_size is what transformers accepts (looked up as row 0): keep accepting it.
    assert from_hf(_patched(None, "image_token_index", 257216)).image_token_index == 257216
    assert from_hf(_patched(None, "image_token_index", 300000)).image_token_index == 300000
    tiny_cfg = tiny()
    assert from_hf(json.loads(json.dumps(tiny_cfg.to_hf()))) == tiny_cfg


def test_load_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_patched("text_config", "hidden_size", None)))
    with pytest.raises(ConfigError, match=r"config.json: text_config.hidden_size must be a positive integer .*null"):
        load_config(tmp_path)
