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
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Gemma's context: GemmaConfig / Gemma2Config `max_position_embeddings` default, which no PaliGemma config.json
# overrides (docs/model.md, "Configurations"). Prompt (image tokens included) + generated tokens must fit.
CONTEXT_LENGTH = 8192


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
    max_position_embeddings: int = CONTEXT_LENGTH  # positions a request may use (prompt + generated): CONTEXT_LENGTH
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
            "max_position_embeddings": t.max_position_embeddings,
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
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=CONTEXT_LENGTH,
)  # fmt: skip
_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=CONTEXT_LENGTH,
    query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
)  # fmt: skip
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")  # old Gemma configs say "gelu" (rewritten)
_LAYER_TYPES = ("sliding_attention", "full_attention")
# Sanity bounds far above every released model (docs/model.md, "Configurations": at most 46 layers, no width
# over 36,864, 257,216 embedding rows). A corrupted value beyond them would build a meta model for minutes, or
# overflow torch's element counts, before the checkpoint could disagree with it.
MAX_LAYERS = 1024
MAX_SIZE = 1 << 20


def _show(value: Any) -> str:
    """A value as config.json spells it (null, true, "x")."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class _Reader:
    """One config.json object: a missing field takes the class default; a present one is checked.

    transformers (5.x, strict config dataclasses) refuses null for every sized field, so null is an error
    here too except where its classes take it: a switched-off sliding window or soft-cap, default layer
    types and rope parameters, and token ids (`_token_id`).
    """

    def __init__(self, d: dict[str, Any], defaults: dict[str, Any], where: str):
        self.d, self.defaults, self.where = d, defaults, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str) -> Any:
        return self.d[key] if key in self.d else self.defaults.get(key)

    def int(self, key: str, upper: int = MAX_SIZE) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= upper:
            raise ConfigError(f"{self.name(key)} must be a positive integer (at most {upper}), got {_show(value)}")
        return value

    def number(self, key: str) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConfigError(f"{self.name(key)} must be a positive number, got {_show(value)}")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self.get(key) is None else self.number(key)

    def optional_int(self, key: str) -> int | None:
        return None if self.get(key) is None else self.int(key)

    def choice(self, key: str, allowed: Any, default: str) -> str:
        value = self.d.get(key, default)
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{self.name(key)} {_show(value)} is not {' or '.join(allowed)}")
        return value

    def token_id(self, key: str, vocab_size: int, default: int) -> int:
        value = self.d.get(key)
        return default if value is None else _token_id(value, self.name(key), vocab_size)


def _token_id(value: Any, name: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ConfigError(f"{name} must be a token id below vocab_size {vocab_size}, got {_show(value)}")
    return value


def _siglip_from_hf(v: dict[str, Any]) -> SiglipConfig:
    r = _Reader(v, _SIGLIP_DEFAULTS, "vision_config")
    r.choice("model_type", ("siglip_vision_model",), "siglip_vision_model")
    ints = {
        k: r.int(k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size")
    }
    ints["num_hidden_layers"] = r.int("num_hidden_layers", MAX_LAYERS)
    ints["num_channels"] = r.int("num_channels")
    if ints["num_channels"] != 3:
        raise ConfigError(
            f"vision_config.num_channels must be 3 (the processor makes RGB images), got {_show(v['num_channels'])}"
        )
    # vision_config.num_positions (256 in PG2-448/896 configs) is bogus: the table has num_patches rows.
    r.choice("hidden_act", _GELU_TANH, "gelu_pytorch_tanh")
    if v.get("vision_use_head", False) is not False:
        raise ConfigError(
            f"vision_config.vision_use_head must be false (no PaliGemma has one), got {_show(v['vision_use_head'])}"
        )
    width, heads = ints["hidden_size"], ints["num_attention_heads"]
    if width % heads:
        raise ConfigError(f"vision_config.hidden_size {width} is not divisible by num_attention_heads {heads}")
    if ints["image_size"] % ints["patch_size"]:
        raise ConfigError(
            f"vision_config.image_size {ints['image_size']} is not a multiple of patch_size {ints['patch_size']}"
        )
    return SiglipConfig(**ints, layer_norm_eps=r.number("layer_norm_eps"))


def _rope_theta(r: _Reader) -> float:
    # transformers 5.x writes rope_parameters {"rope_theta": ..., "rope_type": "default"}; 4.x writes rope_theta.
    if r.d.get("rope_scaling") is not None:
        raise ConfigError(f"text_config.rope_scaling {_show(r.d['rope_scaling'])} is not supported")
    params = r.d.get("rope_parameters")
    if params is None:
        return r.number("rope_theta")
    if not isinstance(params, dict):
        raise ConfigError(f"text_config.rope_parameters must be an object, got {_show(params)}")
    p = _Reader(params, {"rope_theta": r.number("rope_theta")}, "text_config.rope_parameters")
    p.choice("rope_type", ("default",), "default")
    return p.number("rope_theta")


def _sliding_layers(r: _Reader, n: int) -> tuple[int, ...]:
    layer_types = r.d.get("layer_types")
    if layer_types is None:  # Gemma2Config default: even layers slide, odd layers are global
        return tuple(i for i in range(n) if (i + 1) % 2)
    if not isinstance(layer_types, list) or len(layer_types) != n or not all(k in _LAYER_TYPES for k in layer_types):
        raise ConfigError(
            f"text_config.layer_types must list {n} of {', '.join(_LAYER_TYPES)}, got {_show(layer_types)}"
        )
    return tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")


def _gemma_from_hf(t: dict[str, Any]) -> GemmaConfig:
    model_type = _Reader(t, {}, "text_config").choice("model_type", ("gemma", "gemma2"), "gemma")
    gemma2 = model_type == "gemma2"
    r = _Reader(t, _GEMMA2_DEFAULTS if gemma2 else _GEMMA_DEFAULTS, "text_config")
    ints = {k: r.int(k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                  "num_key_value_heads", "head_dim", "max_position_embeddings")}  # fmt: skip
    ints["num_hidden_layers"] = r.int("num_hidden_layers", MAX_LAYERS)
    if ints["num_attention_heads"] % ints["num_key_value_heads"]:
        raise ConfigError(
            f"text_config.num_attention_heads {ints['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads {ints['num_key_value_heads']}"
        )
    if ints["head_dim"] % 2:
        raise ConfigError(f"text_config.head_dim must be even (rotary embeddings rotate pairs), got {ints['head_dim']}")
    for key in ("hidden_activation", "hidden_act"):  # Gemma 2 names it hidden_activation; either may be present
        r.choice(key, _GELU_TANH, "gelu_pytorch_tanh")
    common = dict(ints, rms_norm_eps=r.number("rms_norm_eps"), rope_theta=_rope_theta(r))
    if not gemma2:
        return GemmaConfig(**common)
    window = r.optional_int("sliding_window")  # an explicit null switches the window off
    return GemmaConfig(
        **common,
        post_norms=True,
        attn_logit_softcap=r.optional_number("attn_logit_softcapping"),
        final_logit_softcap=r.optional_number("final_logit_softcapping"),
        query_pre_attn_scalar=r.int("query_pre_attn_scalar"),
        sliding_window=window,
        sliding_layers=_sliding_layers(r, ints["num_hidden_layers"]) if window is not None else (),
    )


def _eos_ids(r: _Reader, vocab_size: int) -> tuple[int, ...]:
    """text_config.eos_token_id (an id or a list: PaliGemma 2 says [1, 107]); missing or null: ()."""
    value = r.d.get("eos_token_id")
    ids = value if isinstance(value, list) else [] if value is None else [value]
    return tuple(_token_id(i, r.name("eos_token_id"), vocab_size) for i in ids)


def from_hf(d: dict[str, Any]) -> PaliGemmaConfig:
    """Parse the dict of a Hub PaliGemma / PaliGemma 2 `config.json`; every field the model reads is checked.

    Each failure is one ConfigError naming the field and its value.
    """
    if not isinstance(d, dict):
        raise ConfigError("config.json does not hold a JSON object")
    r = _Reader(d, {}, "")
    r.choice("model_type", ("paligemma",), "paligemma")
    t, v = d.get("text_config"), d.get("vision_config")
    if not isinstance(t, dict) or not isinstance(v, dict):
        # transformers would build its default sub-configs (a SigLIP with intermediate_size 4096, which no
        # released checkpoint has): a config.json without them describes no real model.
        raise ConfigError("config.json needs text_config and vision_config objects")
    text, vision = _gemma_from_hf(t), _siglip_from_hf(v)
    if "projection_dim" in d and d["projection_dim"] != text.hidden_size:
        raise ConfigError(
            f"projection_dim {_show(d['projection_dim'])} differs from text hidden_size {text.hidden_size}"
        )
    image_key = "image_token_id" if "image_token_id" in d and "image_token_index" not in d else "image_token_index"
    image_token = d.get(image_key, 256000)  # PaliGemmaConfig's class default
    if isinstance(image_token, bool) or not isinstance(image_token, int) or image_token < 0:
        # May equal or exceed vocab_size: transformers looks such an id up as 0 (docs/model.md, "Forward pass").
        raise ConfigError(f"{image_key} must be a non-negative integer, got {_show(image_token)}")
    vocab = text.vocab_size
    text_eos, top_eos = _eos_ids(_Reader(t, {}, "text_config"), vocab), _eos_ids(r, vocab)  # both checked
    eos = text_eos or top_eos or (1,)  # GemmaConfig's default
    return PaliGemmaConfig(
        vision=vision,
        text=text,
        image_token_index=image_token,
        # null: transformers keeps None and its processor takes the ids from the tokenizer, whose <pad> / <bos>
        # are 0 / 2 in every Gemma vocabulary (docs/model.md, "Prompt and tokens"), the class defaults.
        pad_token_id=r.token_id("pad_token_id", vocab, 0),
        bos_token_id=r.token_id("bos_token_id", vocab, 2),
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
