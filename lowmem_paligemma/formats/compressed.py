"""Pre-quantized checkpoints in compressed-tensors' layout: config.json's `quantization_config` block, written
and read, for every registered format that declares a `compressed` scheme.

compressed-tensors' layout is the one transformers loads through the `compressed-tensors` package (and vLLM
reads), so a checkpoint written by `convert --quantize` is not a private format. What the block holds (read off
compressed-tensors 0.20: `quantization/quant_config.py`, `quantization/quant_args.py`; docs/quantization.md,
"Pre-quantized checkpoints", has the whole story): quant_method "compressed-tensors", quantization_status
"compressed", one config group per format (its `targets`: "re:" regexes matched against module names, its
`weights`: the format's QuantizationArgs, and its `format`), weight-only, and the top-level `format` (the groups'
one format, or "mixed-precision"). What each format stores per layer is the format's (`stored_tensors`). Both
built-in schemes dequantize as w = q * scale whatever rule chose q and scale, so our rounded-up scales are valid
ones. Nothing here imports compressed-tensors: it is an optional package (the `interop` extra).
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

from ..errors import ConfigError
from . import registry

QUANT_METHOD = "compressed-tensors"
MIXED_FORMAT = "mixed-precision"  # the top-level format when the groups' formats differ


def _storable() -> list[registry.WeightFormat]:
    return [registry.get(n) for n in registry.names() if registry.get(n).compressed is not None]


def target(module_name: str) -> str:
    """A config-group target for every layer like `module_name` (a Hub name, e.g.
    language_model.model.layers.3.mlp.down_proj): a regex that ignores the layer index and the prefixes the
    writers differ in (transformers 5 holds the same layer as model.language_model.layers.3.mlp.down_proj)."""
    head, sep, tail = module_name.partition(".layers.")
    if not sep:
        raise ValueError(f"{module_name}: only the towers' layers are stored quantized")
    tower, leaf = head.split(".")[0], tail.partition(".")[2]
    return rf"re:.*{re.escape(tower)}\..*layers\.\d+\.{re.escape(leaf)}$"


def quantization_config(layers: dict[str, str]) -> dict[str, Any]:
    """config.json's `quantization_config` for `layers` {Hub module name: format name}."""
    groups = {}
    for name in sorted(set(layers.values()), key=registry.names().index, reverse=True):
        scheme = registry.get(name).compressed
        if scheme is None:
            raise ValueError(f"weight format {name!r} has no compressed-tensors scheme")
        groups[f"group_{len(groups)}"] = {
            "targets": sorted({target(module) for module, fmt in layers.items() if fmt == name}),
            "weights": dict(scheme.weights),
            "input_activations": None,
            "output_activations": None,
            "format": scheme.format,
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


def parse_quantization_config(config: dict[str, Any]) -> str | None:
    """The format a config.json dict's `quantization_config` stores, None without one.

    Each group must be a registered format's scheme; groups of several formats name the one whose fallbacks
    hold the others (int4 with int8 layers is "int4"). Reads what `quantization_config` writes and what
    llm-compressor writes for the same schemes; anything else (other bit widths or strategies, activation
    quantization, other formats) is a one-line ConfigError.
    """
    qc = config.get("quantization_config") if isinstance(config, dict) else None  # not a dict: from_hf says so
    if qc is None:
        return None
    readable = " or ".join(
        f"{f.name} {_scheme_text(f.compressed.weights)} ({f.compressed.format})" for f in _storable()
    )

    def refuse(field: str, value: Any) -> NoReturn:
        text = json.dumps(value)  # as config.json spells it (null, true, "text"), cut to one short line
        text = text if len(text) <= 60 else text[:57] + "..."
        raise ConfigError(f"quantization_config{field} is {text}; lowmem_paligemma reads {readable}, weight-only")

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
    found = []
    for name, scheme in groups.items():
        at = f".config_groups.{name}"
        if not isinstance(scheme, dict) or not isinstance(scheme.get("weights"), dict):
            refuse(f"{at}.weights", scheme.get("weights") if isinstance(scheme, dict) else scheme)
        for key in ("input_activations", "output_activations"):
            if scheme.get(key) is not None:
                refuse(f"{at}.{key}", scheme[key])
        found.append(_match(scheme, qc.get("format"), at, refuse))
    for name in found:
        if set(found) <= set(registry.fallback_chain(name)):
            return name
    refuse(".config_groups", sorted(set(found)))


def _scheme_text(weights: dict[str, Any]) -> str:
    if weights["strategy"] == "channel":
        return "per channel"
    return f"in groups of {weights['group_size']}" if weights["strategy"] == "group" else weights["strategy"]


def _match(scheme: dict[str, Any], top_format: Any, at: str, refuse) -> str:
    """The registered format whose scheme a config group is, else refuse the first field that differs from the
    closest one (same bit width)."""
    weights = scheme["weights"]
    candidates = [f for f in _storable() if f.compressed.weights["num_bits"] == weights.get("num_bits")]
    if not candidates:
        refuse(f"{at}.weights.num_bits", weights.get("num_bits"))
    fmt_name = scheme.get("format") or top_format
    first_miss = None
    for fmt in candidates:
        want = fmt.compressed.weights
        misses = [k for k in ("type", "symmetric", "strategy", "group_size") if weights.get(k) != want[k]]
        if weights.get("dynamic", False) is not False:
            misses.append("dynamic")
        if fmt_name != fmt.compressed.format:
            misses.append("format")
        if not misses:
            return fmt.name
        first_miss = first_miss or misses[0]
    if first_miss == "format":
        refuse(f"{at}.format" if scheme.get("format") else ".format", fmt_name)
    refuse(f"{at}.weights.{first_miss}", weights.get(first_miss))
