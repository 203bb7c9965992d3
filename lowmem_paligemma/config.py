"""Typed configuration for PaliGemma (Gemma decoder) and PaliGemma 2 (Gemma 2 decoder).

One dataclass per tower. Gemma 2 is a set of behaviour flags on `GemmaConfig`
(post-norms, soft-caps, sliding window, query_pre_attn_scalar), not a second model.

`from_hf` parses a Hub `config.json`. Hub configs omit many fields, so the defaults
are load-bearing: each missing field takes the default of the transformers class
that wrote the file (SiglipVisionConfig, GemmaConfig, Gemma2Config; docs/model.md, "Config traps").
No torch import here: configs are plain data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16  # head_dim = 1152 / 16 = 72
    num_channels: int = 3
    image_size: int = 224  # 224 / 448 / 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        # Also the number of position-embedding rows and of <image> tokens in the prompt.
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int = 257216  # embedding rows: 256000 text + 1024 loc + 128 seg + <image> + 63 padding
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1  # 1 = MQA (PaliGemma 1), < heads = GQA (PaliGemma 2)
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Gemma 2 behaviour flags; the Gemma 1 values switch each feature off.
    post_norms: bool = False  # post_attention/post_feedforward norms around each sub-block
    attn_logit_softcap: float | None = None  # tanh(s / c) * c on attention scores
    final_logit_softcap: float | None = None  # tanh(l / c) * c on output logits
    query_pre_attn_scalar: int | None = None  # attention scale = this ** -0.5 (None: head_dim)
    sliding_window: int | None = None  # keys visible to a query on sliding layers (self included)
    sliding_layers: tuple[int, ...] = ()  # layer indices that use the sliding window

    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer_idx: int) -> bool:
        return self.sliding_window is not None and layer_idx in self.sliding_layers


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    text: GemmaConfig = field(default_factory=GemmaConfig)
    image_token_index: int = 257152
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)  # PaliGemma 2 text configs list (1, 107)

    @property
    def projection_dim(self) -> int:
        # The projector maps vision width to text width; the Hub's projection_dim always equals it.
        return self.text.hidden_size

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def is_gemma2(self) -> bool:
        return self.text.post_norms

    def to_hf(self) -> dict[str, Any]:
        """The config.json the Hub ships for this model (legacy layout, docs/model.md, "Config traps")."""
        v, t = self.vision, self.text
        text: dict[str, Any] = {
            "model_type": "gemma2" if self.is_gemma2 else "gemma",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "hidden_activation": "gelu_pytorch_tanh",
            "num_image_tokens": self.num_image_tokens,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
        }
        if self.is_gemma2:
            text |= {
                "attn_logit_softcapping": t.attn_logit_softcap,
                "final_logit_softcapping": t.final_logit_softcap,
                "query_pre_attn_scalar": int(t.query_pre_attn_scalar),  # transformers wants an int
                "sliding_window": t.sliding_window,
                "layer_types": [
                    "sliding_attention" if t.is_sliding(i) else "full_attention" for i in range(t.num_hidden_layers)
                ],
                "cache_implementation": "hybrid",
            }
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
            "num_image_tokens": self.num_image_tokens,
            "projection_dim": self.projection_dim,
            "vision_use_head": False,
        }
        return {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "model_type": "paligemma",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "image_token_index": self.image_token_index,
            "projection_dim": self.projection_dim,
            "hidden_size": 2048,  # legacy top-level field, unused by the math (docs/model.md, "Config traps")
            "vocab_size": t.vocab_size,
            "text_config": text,
            "vision_config": vision,
            "torch_dtype": "float32",
        }


# --- parsing a Hub config.json -------------------------------------------------------------------------

# Defaults of the transformers 5.23 classes for fields that Hub configs leave out (docs/model.md, "Config traps";
# checked by instantiating PaliGemmaConfig with sparse sub-config dicts).
_SIGLIP_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6,
)  # fmt: skip
_GEMMA_DEFAULTS = dict(
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
)  # fmt: skip
_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
)  # fmt: skip
_GELU_TANH = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"}  # old Gemma configs say "gelu" (rewritten)


def _get(d: dict[str, Any], defaults: dict[str, Any], key: str) -> Any:
    value = d.get(key)
    return defaults[key] if value is None else value


def _int_field(d: dict[str, Any], defaults: dict[str, Any], key: str, where: str) -> int:
    value = _get(d, defaults, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}.{key} must be a positive integer, got {value!r}")
    return value


def _siglip_from_hf(v: dict[str, Any]) -> SiglipConfig:
    ints = {k: _int_field(v, _SIGLIP_DEFAULTS, k, "vision_config") for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_channels", "image_size", "patch_size")}  # fmt: skip
    # vision_config.num_positions (256 in PG2-448/896 configs) is bogus: the table has num_patches rows.
    act = v.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        raise ConfigError(f"vision_config.hidden_act {act!r} is not supported (SigLIP uses gelu_pytorch_tanh)")
    if v.get("vision_use_head"):
        raise ConfigError("vision_config.vision_use_head=true is not a PaliGemma vision tower")
    if ints["hidden_size"] % ints["num_attention_heads"]:
        raise ConfigError("vision_config.hidden_size is not divisible by num_attention_heads")
    if ints["image_size"] % ints["patch_size"]:
        raise ConfigError("vision_config.image_size is not a multiple of patch_size")
    return SiglipConfig(**ints, layer_norm_eps=float(_get(v, _SIGLIP_DEFAULTS, "layer_norm_eps")))


def _rope_theta(t: dict[str, Any], defaults: dict[str, Any]) -> float:
    # transformers 5.x writes rope_parameters {"rope_theta": ..., "rope_type": "default"}; 4.x writes rope_theta.
    params = t.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"text_config.rope_parameters.rope_type {params['rope_type']!r} is not supported")
    return float(params.get("rope_theta") or _get(t, defaults, "rope_theta"))


def _gemma_from_hf(t: dict[str, Any]) -> GemmaConfig:
    model_type = t.get("model_type", "gemma")
    if model_type not in ("gemma", "gemma2"):
        raise ConfigError(f"text_config.model_type {model_type!r} is not gemma or gemma2")
    gemma2 = model_type == "gemma2"
    defaults = _GEMMA2_DEFAULTS if gemma2 else _GEMMA_DEFAULTS
    ints = {k: _int_field(t, defaults, k, "text_config") for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim")}  # fmt: skip
    if ints["num_attention_heads"] % ints["num_key_value_heads"]:
        raise ConfigError("text_config.num_attention_heads is not a multiple of num_key_value_heads")
    act = t.get("hidden_activation") or t.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        raise ConfigError(f"text_config activation {act!r} is not supported (Gemma uses gelu_pytorch_tanh)")
    common = dict(ints, rms_norm_eps=float(_get(t, defaults, "rms_norm_eps")), rope_theta=_rope_theta(t, defaults))
    if not gemma2:
        return GemmaConfig(**common)
    n = ints["num_hidden_layers"]
    layer_types = t.get("layer_types")
    if layer_types is None:  # Gemma2Config default: even layers slide, odd layers are global
        sliding = tuple(i for i in range(n) if (i + 1) % 2)
    elif len(layer_types) != n:
        raise ConfigError(f"text_config.layer_types has {len(layer_types)} entries for {n} layers")
    else:
        sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    window = t.get("sliding_window", defaults["sliding_window"])  # explicit null switches the window off
    attn_cap = t.get("attn_logit_softcapping", defaults["attn_logit_softcapping"])
    final_cap = t.get("final_logit_softcapping", defaults["final_logit_softcapping"])
    return GemmaConfig(
        **common,
        post_norms=True,
        attn_logit_softcap=None if attn_cap is None else float(attn_cap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
        query_pre_attn_scalar=int(_get(t, defaults, "query_pre_attn_scalar")),
        sliding_window=None if window is None else int(window),
        sliding_layers=sliding if window is not None else (),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    ids = value if isinstance(value, list) else [value]
    return tuple(int(i) for i in ids if i is not None)


def from_hf(d: dict[str, Any]) -> PaliGemmaConfig:
    """Parse the dict of a Hub PaliGemma / PaliGemma 2 `config.json`."""
    if not isinstance(d, dict):
        raise ConfigError("config.json does not hold a JSON object")
    if d.get("model_type") not in (None, "paligemma"):
        raise ConfigError(f"model_type {d.get('model_type')!r} is not paligemma")
    t, v = d.get("text_config"), d.get("vision_config")
    if not isinstance(t, dict) or not isinstance(v, dict):
        raise ConfigError("config.json needs text_config and vision_config objects")
    text, vision = _gemma_from_hf(t), _siglip_from_hf(v)
    if d.get("projection_dim") not in (None, text.hidden_size):
        raise ConfigError(f"projection_dim {d['projection_dim']} differs from text hidden_size {text.hidden_size}")
    eos = _eos_ids(t.get("eos_token_id")) or _eos_ids(d.get("eos_token_id", 1))
    return PaliGemmaConfig(
        vision=vision,
        text=text,
        image_token_index=int(d.get("image_token_index", d.get("image_token_id", 256000))),  # class default 256000
        pad_token_id=int(d.get("pad_token_id") if d.get("pad_token_id") is not None else 0),
        bos_token_id=int(d.get("bos_token_id") if d.get("bos_token_id") is not None else 2),
        eos_token_ids=eos,
    )


def read_config_json(model_dir: str | Path) -> Any:
    """The parsed config.json of a model directory (what other readers, e.g. compressed.py, need of it too)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the model directory")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_config(model_dir: str | Path) -> PaliGemmaConfig:
    """config.json -> PaliGemmaConfig (a `quantization_config` in it is compressed.py's to read)."""
    path = Path(model_dir) / "config.json"
    d = read_config_json(model_dir)
    try:
        return from_hf(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# --- presets ---------------------------------------------------------------------------------------------

_PG1_TEXT = GemmaConfig()  # google/paligemma-3b-pt-224 config.json; convert_paligemma_weights_to_hf.py
_PG2_TEXT = {
    # convert_paligemma2_weights_to_hf.py::VARIANT_CONFIGS; google/gemma_pytorch gemma/config.py
    "3b": GemmaConfig(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                      num_key_value_heads=4, query_pre_attn_scalar=256),
    "10b": GemmaConfig(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                       num_key_value_heads=8, query_pre_attn_scalar=256),
    # 28B: head_dim 128 and query_pre_attn_scalar = 4608 // 32 = 144 ("scaling is different for the 28b").
    "28b": GemmaConfig(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                       num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
}  # fmt: skip


def _gemma2(text: GemmaConfig) -> GemmaConfig:
    n = text.num_hidden_layers
    return replace(text, post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
                   sliding_layers=tuple(range(0, n, 2)))  # fmt: skip


def _presets() -> dict[str, PaliGemmaConfig]:
    out = {}
    for res in (224, 448, 896):
        vision = SiglipConfig(image_size=res)
        out[f"paligemma-3b-{res}"] = PaliGemmaConfig(vision=vision, text=_PG1_TEXT)
        for size, text in _PG2_TEXT.items():
            out[f"paligemma2-{size}-{res}"] = PaliGemmaConfig(vision=vision, text=_gemma2(text), eos_token_ids=(1, 107))
    return out


PRESETS: dict[str, PaliGemmaConfig] = _presets()


# The tiny test tokenizer (synth.write_tokenizer(base_vocab=512)) keeps the real layout shifted down:
# <loc0000> at 512, <seg000> at 1536, <image> at 1664; 1728 embedding rows (padded to a multiple of 64).
TINY_BASE_VOCAB = 512
TINY_IMAGE_TOKEN = TINY_BASE_VOCAB + 1024 + 128


def tiny(gemma2: bool = False, **text_overrides: Any) -> PaliGemmaConfig:
    """A tiny random-test config: 16 image tokens, a few layers, the real prompt layout.

    docs/model.md, "Making tiny test models that can fail", says what makes such a model a useful test subject.
    """
    vision = SiglipConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=7)  # fmt: skip
    text = GemmaConfig(vocab_size=1728, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16)  # fmt: skip
    if gemma2:
        # GQA, a window shorter than the prompt, a scale that differs from head_dim, small caps that bite.
        text = replace(text, num_key_value_heads=2, post_norms=True, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                       query_pre_attn_scalar=24, sliding_window=8, sliding_layers=(0, 2))  # fmt: skip
    text = replace(text, **text_overrides)
    return PaliGemmaConfig(vision=vision, text=text, image_token_index=TINY_IMAGE_TOKEN,
                           eos_token_ids=(1, 107) if gemma2 else (1,))  # fmt: skip
