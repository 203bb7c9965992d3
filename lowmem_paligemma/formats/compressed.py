"""Pre-quantized checkpoints in compressed-tensors' layout: the config block, the stored names, int4 packing.

compressed-tensors' layout is the one transformers loads through the `compressed-tensors` package (and vLLM
reads), so a checkpoint written by `convert --quantize` is not a private format. What is stored (read off
compressed-tensors 0.20: `compressors/naive_quantized/base.py`, `compressors/pack_quantized/helpers.py`,
`quantization/quant_config.py`; docs/quantization.md, "Pre-quantized checkpoints", has the whole story):
- config.json's `quantization_config`: quant_method "compressed-tensors", quantization_status "compressed",
  one config group per precision (its `targets`: "re:" regexes matched against module names, and its
  `weights`: num_bits, type "int", symmetric, strategy, group_size), weight-only, and the top-level `format`
  (the groups' one format, or "mixed-precision").
- int8, one scale per output row, format "naive-quantized": `weight` int8 (O, I) and `weight_scale` (O, 1)
  in the model dtype, exactly what quant.Int8Linear holds: loading is a copy, or a mapping (zero-copy).
- int4, symmetric groups of g along the input, format "pack-quantized": `weight_packed` int32 (O, I/8),
  `weight_scale` (O, I/g) in the model dtype and `weight_shape` int64 [O, I]; no zero point (symmetric).
  A row's value j is stored as the nibble q + 8 at bits 4 * (j % 8) of word j // 8: on a little-endian
  host, byte j // 2, low nibble first. torch's CPU int4 layout depends on the machine, so quant.Int4Linear
  unpacks these rows and repacks them while streaming.
Both formats dequantize as w = q * scale whatever rule chose q and scale, so quant.py's rounded-up scales
are valid ones. Nothing here imports compressed-tensors: it is an optional package (the `interop` extra).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..errors import ConfigError
from ..model.config import read_config_json

QUANT_METHOD = "compressed-tensors"
FORMATS = {"int8": "naive-quantized", "int4": "pack-quantized"}  # our mode -> compressed-tensors' format
MIXED_FORMAT = "mixed-precision"  # the top-level format when the groups' formats differ
INT4_PER_INT32 = 8


def stored_tensors(
    mode: str, out_features: int, in_features: int, dtype: torch.dtype, group: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What one quantized linear layer stores in `mode`: {local name: (dtype, shape)}, in the order written."""
    if mode == "int8":
        return {"weight": (torch.int8, (out_features, in_features)), "weight_scale": (dtype, (out_features, 1))}
    return {
        "weight_packed": (torch.int32, (out_features, in_features // INT4_PER_INT32)),
        "weight_scale": (dtype, (out_features, in_features // group)),
        "weight_shape": (torch.int64, (2,)),
    }


# --- int4 packing --------------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (n, I) integers in [-8, 7], I a multiple of 8 -> (n, I/8) int32 as compressed-tensors'
    `pack_to_int32(q, 4)` writes them."""
    if sys.byteorder != "little":  # the nibble order below is the bytes of little-endian words
        raise NotImplementedError("int4 packing assumes a little-endian host")
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # (n, I) in [0, 15]
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous().view(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(n, I/8) int32 from `pack_int4` (or compressed-tensors) -> q (n, I) int32 in [-8, 7]."""
    if sys.byteorder != "little":
        raise NotImplementedError("int4 unpacking assumes a little-endian host")
    b = packed.contiguous().view(torch.uint8)  # (n, I/2): two values a byte, the even one low
    return torch.stack([b & 15, b >> 4], -1).view(len(packed), -1).to(torch.int32) - 8


# --- the config block ----------------------------------------------------------------------------------------


def _weights(mode: str, group: int) -> dict[str, Any]:
    """A config group's `weights` (compressed-tensors' QuantizationArgs, the fields it writes)."""
    if mode == "int8":
        return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
                "dynamic": False}  # fmt: skip
    return {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group, "strategy": "group", "dynamic": False}


def target(module_name: str) -> str:
    """A config-group target for every layer like `module_name` (a Hub name, e.g.
    language_model.model.layers.3.mlp.down_proj): a regex that ignores the layer index and the prefixes the
    writers differ in (transformers 5 holds the same layer as model.language_model.layers.3.mlp.down_proj)."""
    head, sep, tail = module_name.partition(".layers.")
    if not sep:
        raise ValueError(f"{module_name}: only the towers' layers are stored quantized")
    tower, leaf = head.split(".")[0], tail.partition(".")[2]
    return rf"re:.*{re.escape(tower)}\..*layers\.\d+\.{re.escape(leaf)}$"


def quantization_config(layers: dict[str, str], group: int) -> dict[str, Any]:
    """config.json's `quantization_config` for `layers` {Hub module name: "int8" or "int4"}."""
    groups = {}
    for mode in ("int4", "int8"):
        names = [name for name, m in layers.items() if m == mode]
        if names:
            groups[f"group_{len(groups)}"] = {
                "targets": sorted({target(name) for name in names}),
                "weights": _weights(mode, group),
                "input_activations": None,
                "output_activations": None,
                "format": FORMATS[mode],
            }
    formats = {g["format"] for g in groups.values()}
    return {
        "config_groups": groups,
        "quant_method": QUANT_METHOD,
        "kv_cache_scheme": None,
        "format": formats.pop() if len(formats) == 1 else MIXED_FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": [],
    }


def parse_quantization_config(config: dict[str, Any], group: int) -> str | None:
    """The mode ("int8" or "int4") a config.json dict's `quantization_config` stores, None without one.

    Reads what `quantization_config` writes and what llm-compressor writes for the same schemes; anything
    else (other bit widths or strategies, activation quantization, other formats) is a one-line ConfigError.
    """
    qc = config.get("quantization_config") if isinstance(config, dict) else None  # not a dict: from_hf says so
    if qc is None:
        return None
    readable = f"int8 per channel ({FORMATS['int8']}) or int4 in groups of {group} ({FORMATS['int4']}), weight-only"

    def refuse(field: str, value: Any) -> NoReturn:
        text = json.dumps(value)  # as config.json spells it (null, true, "text"), cut to one short line
        text = text if len(text) <= 60 else text[:57] + "..."
        raise ConfigError(f"quantization_config{field} is {text}; lowmem_paligemma reads {readable}")

    if not isinstance(qc, dict):
        refuse("", qc)
    if qc.get("quant_method") != QUANT_METHOD:
        refuse(".quant_method", qc.get("quant_method"))
    if qc.get("quantization_status", "compressed") != "compressed":  # "frozen": float weights plus scales
        refuse(".quantization_status", qc.get("quantization_status"))
    if qc.get("kv_cache_scheme") is not None:
        refuse(".kv_cache_scheme", qc["kv_cache_scheme"])
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        refuse(".config_groups", groups)
    modes = set()
    for name, scheme in groups.items():
        at = f".config_groups.{name}"
        if not isinstance(scheme, dict) or not isinstance(scheme.get("weights"), dict):
            refuse(f"{at}.weights", scheme.get("weights") if isinstance(scheme, dict) else scheme)
        for key in ("input_activations", "output_activations"):
            if scheme.get(key) is not None:
                refuse(f"{at}.{key}", scheme[key])
        weights = scheme["weights"]
        mode = {8: "int8", 4: "int4"}.get(weights.get("num_bits"))
        if mode is None:
            refuse(f"{at}.weights.num_bits", weights.get("num_bits"))
        want = _weights(mode, group)
        for key in ("type", "symmetric", "strategy") + (("group_size",) if mode == "int4" else ()):
            if weights.get(key) != want[key]:
                refuse(f"{at}.weights.{key}", weights.get(key))
        if weights.get("dynamic", False) is not False:
            refuse(f"{at}.weights.dynamic", weights["dynamic"])
        fmt = scheme.get("format") or qc.get("format")
        if fmt != FORMATS[mode]:
            refuse(f"{at}.format" if scheme.get("format") else ".format", fmt)
        modes.add(mode)
    return "int4" if "int4" in modes else "int8"


def stored_mode(model_dir: str | Path, group: int) -> str | None:
    """`parse_quantization_config` of a model directory's config.json; errors name the file."""
    config = read_config_json(model_dir)
    try:
        return parse_quantization_config(config, group)
    except ConfigError as e:
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: {e}") from None
