"""Kernels (and the CPU compute dtype) chosen by measuring them on the running machine, and remembered.

The machines this runs on differ: bf16 `torch.mv` was 1.3x faster than `F.linear` on an AMX Xeon and 2x
slower on an AVX512-BF16 EPYC; float16 GEMMs were 5x slower than bfloat16 on one and fp16 products the
fastest decode on the other. So at first use the runtime times each weight format's candidate kernels
(ops.CANDIDATES) on the model's own largest layer shape, for a decode step (1 row) and a prefill (256 rows),
in a second or two, keeps the fastest, and caches the choice in a JSON file keyed by the CPU model and
flags, the torch version, the thread count, the format, dtype and shape. A cache entry is only trusted if
it has exactly the expected form; a corrupt or foreign file is ignored and rewritten.

Overrides, for ablations and for a user who knows better: `LOWMEM_PALIGEMMA_KERNELS` or the `kernels`
load option, e.g. "dense=linear/linear,int8=int8pack/dequant" (format=decode/prefill), or "reference" for
the reference kernels everywhere. `lowmem-paligemma info` shows what was chosen and the timings behind it.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.safetensors_io import WEIGHT_DTYPES, dtype_name
from ..errors import OptionError
from ..machine import cpu
from . import ops
from .ops import CANDIDATES, REFERENCE, KernelChoice

ENV_KERNELS = "LOWMEM_PALIGEMMA_KERNELS"
ENV_CACHE = "LOWMEM_PALIGEMMA_CACHE"  # a directory; default $XDG_CACHE_HOME/lowmem_paligemma or ~/.cache/...
CACHE_VERSION = 2
PREFILL_ROWS = 256  # about a 224-px prompt (256 image tokens + text)
DECODE_TOKENS = 32  # the decode share of a request when the dtype is chosen: 32 tokens after the prefill
TIME_PER_CANDIDATE_S = 0.25  # timing stops after this (at least 2 runs after a warm-up)


@dataclass(frozen=True)
class Measured:
    """One choice: which kernel for a format and phase, or which dtype, and the medians behind it."""

    what: str  # "int8 decode", "dense prefill", "dtype", ...
    key: str  # the cache key
    choice: str
    seconds: dict[str, float]  # candidate -> median seconds (empty: one candidate, nothing to measure)
    source: str  # "measured" | "cache" | "override" | "reference" | "the only candidate"


@dataclass
class KernelReport:
    plan: dict[str, KernelChoice] = field(default_factory=dict)
    details: list[Measured] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": {fmt: asdict(choice) for fmt, choice in self.plan.items()},
            "details": [asdict(m) for m in self.details],
        }

    def lines(self) -> list[str]:
        out = []
        for m in self.details:
            timings = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(m.seconds.items(), key=lambda kv: kv[1]))
            out.append(f"{m.what}: {m.choice} ({m.source}{'; ' + timings if timings else ''})")
        return out


# --- the cache -----------------------------------------------------------------------------------------------


def cache_path() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]) / "kernels.json"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowmem_paligemma" / "kernels.json"


def machine_key() -> str:
    c = cpu()
    return f"{c.model}|{' '.join(c.flags)}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION or not isinstance(doc.get("entries"), dict):
        return {}
    return doc["entries"]


def _valid(fmt: str, entry: Any) -> bool:
    """A cache entry of exactly the expected form, naming kernels that exist."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("choice"), str)
        or not isinstance(entry.get("seconds"), dict)
    ):
        return False
    decode, _, prefill = entry["choice"].partition("/")
    allowed = {f"{phase} {name}" for phase, names in CANDIDATES[fmt].items() for name in names}
    return (
        decode in CANDIDATES[fmt]["decode"]
        and prefill in CANDIDATES[fmt]["prefill"]
        and ops.valid_choice(decode, prefill)
        and all(k in allowed and isinstance(v, (int, float)) for k, v in entry["seconds"].items())
    )


def _write_cache(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only home: measure again next time


# --- timing --------------------------------------------------------------------------------------------------


def _median_seconds(fn) -> float:
    fn()  # warm-up: first-call allocations, oneDNN primitive creation
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 5 and (len(samples) < 2 or time.perf_counter() - start < TIME_PER_CANDIDATE_S):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _bench_layer(fmt: str, shape: tuple[int, int], dtype: torch.dtype):
    """A random layer of `fmt` and `shape` (out, in): (call(x, kernel_name), in_features)."""
    from . import quant

    o, i = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(o, i, generator=g)
    if fmt == "dense":
        w = w.to(dtype)
        packed = ops.pack_weight(w) if "packed" in _available(fmt, dtype) else None
        return lambda x, name: ops.dense_linear(x, packed if name == "packed" else w, None, KernelChoice(name, name))
    if fmt == "int8":
        q, scale = quant.quantize_int8(w, dtype)
        scratch = ops.Scratch()
        return lambda x, name: ops.int8_linear(x, q, scale, None, KernelChoice(name, name), scratch)
    layer = quant.Int4Linear(i, o, bias=False)
    layer.to(dtype)
    layer._fill(w, 0)
    return lambda x, name: layer(x)


@functools.cache
def _available(fmt: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The format's candidate kernels this machine can run (oneDNN packs float16 only with AVX512-FP16)."""
    names = {*CANDIDATES[fmt]["decode"], *CANDIDATES[fmt]["prefill"]}
    if "packed" in names:
        try:
            ops.pack_weight(torch.zeros(16, 16, dtype=dtype))
        except (RuntimeError, AttributeError):
            names.discard("packed")
    return tuple(sorted(names))


def _measure(fmt: str, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, float]:
    """Median seconds of each available candidate: {"decode linear": s, "prefill packed": s, ...}."""
    call = _bench_layer(fmt, shape, dtype)
    seconds = {}
    with torch.inference_mode():
        for phase, rows in (("decode", 1), ("prefill", PREFILL_ROWS)):
            x = torch.randn(rows, shape[1]).to(dtype)
            for name in CANDIDATES[fmt][phase]:
                if name in _available(fmt, dtype):
                    seconds[f"{phase} {name}"] = _median_seconds(lambda name=name, x=x: call(x, name))
    return seconds


def _best(fmt: str, seconds: dict[str, float], prompt_rows: int, relayout: bool = True) -> KernelChoice:
    """The valid (decode, prefill) pair with the least time for a request: prefill + DECODE_TOKENS steps.
    `relayout` False keeps the weights as loaded (zero-copy: they are views of the checkpoint file)."""
    pairs = [
        (seconds[f"prefill {p}"] * prompt_rows / PREFILL_ROWS + DECODE_TOKENS * seconds[f"decode {d}"], d, p)
        for d in CANDIDATES[fmt]["decode"]
        for p in CANDIDATES[fmt]["prefill"]
        if ops.valid_choice(d, p)
        and f"decode {d}" in seconds
        and f"prefill {p}" in seconds
        and (relayout or d not in ops.LAYOUTS)
    ]
    _, decode, prefill = min(pairs)
    return KernelChoice(decode, prefill)


# --- choosing ------------------------------------------------------------------------------------------------


def parse_spec(text: str) -> dict[str, KernelChoice]:
    """'int8=int8pack/dequant,dense=mv/linear' -> {format: KernelChoice}; 'reference' -> the reference kernels."""
    text = text.strip()
    if text == "reference":
        return dict(REFERENCE)
    plan = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        fmt, sep, rest = part.partition("=")
        decode, sep2, prefill = rest.partition("/")
        fmt = fmt.strip()
        if not sep or not sep2 or fmt not in CANDIDATES:
            raise OptionError(
                f"kernel spec {part!r}: expected FORMAT=DECODE/PREFILL with FORMAT one of {', '.join(CANDIDATES)}"
            )
        for phase, name in (("decode", decode.strip()), ("prefill", prefill.strip())):
            if name not in CANDIDATES[fmt][phase]:
                options = ", ".join(CANDIDATES[fmt][phase])
                raise OptionError(f"kernel spec {part!r}: {fmt} {phase} kernel {name!r} is not one of {options}")
        if not ops.valid_choice(decode.strip(), prefill.strip()):
            raise OptionError(f"kernel spec {part!r}: 'packed' reorders the weights, so both phases must use it")
        plan[fmt] = KernelChoice(decode.strip(), prefill.strip())
    return plan


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Each weight format in `model` -> its largest linear layer's (out, in): the shape that dominates the time."""
    shapes: dict[str, tuple[int, int]] = {}
    for module in model.modules():
        fmt = getattr(module, "FORMAT", None)
        if fmt is None or not hasattr(module, "in_features") or hasattr(module, "lookup"):
            continue  # embeddings: their logits take the decode kernel whatever is chosen here
        shape = (module.out_features, module.in_features)
        if fmt not in shapes or shape[0] * shape[1] > shapes[fmt][0] * shapes[fmt][1]:
            shapes[fmt] = shape
    return shapes


def _choice_text(choice: KernelChoice) -> str:
    return f"{choice.decode}/{choice.prefill}"


def _format_choice(
    fmt: str, shape: tuple[int, int], dtype: torch.dtype, prompt_rows: int, entries: dict[str, Any], relayout: bool
) -> tuple[Measured, float]:
    """The format's best kernels, from the cache or measured now (then added to `entries`), with the
    request time that pair takes on one layer (for comparing dtypes)."""
    what = f"{fmt} kernels (decode/prefill)"
    names = _available(fmt, dtype)
    if len(names) == 1:  # nothing to measure or cache
        return Measured(what, "", f"{names[0]}/{names[0]}", {}, "the only candidate"), 0.0
    key = f"{fmt}|{dtype_name(dtype)}|{shape[0]}x{shape[1]}|rows {prompt_rows}|{machine_key()}"
    cached = entries.get(key)
    if _valid(fmt, cached):
        choice = _best(fmt, cached["seconds"], prompt_rows, relayout)
        measured = Measured(what, key, f"{choice.decode}/{choice.prefill}", cached["seconds"], "cache")
    else:
        seconds = _measure(fmt, shape, dtype)
        best = _best(fmt, seconds, prompt_rows)
        entries[key] = {"choice": f"{best.decode}/{best.prefill}", "seconds": seconds,
                        "at": datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        choice = _best(fmt, seconds, prompt_rows, relayout)
        measured = Measured(what, key, f"{choice.decode}/{choice.prefill}", seconds, "measured")
    decode, _, prefill = measured.choice.partition("/")
    s = measured.seconds
    return measured, s[f"prefill {prefill}"] * prompt_rows / PREFILL_ROWS + DECODE_TOKENS * s[f"decode {decode}"]


def choose_kernels(
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device | str,
    spec: str | None = None,
    prompt_rows: int = 264,
    relayout: bool = True,
) -> KernelReport:
    """The kernel plan for `model` (built on meta is enough) on this machine; see the module docstring.
    `prompt_rows` weighs prefill against decode when a layout serves both (a 224-px prompt: 256 + text);
    `relayout` False excludes kernels that reorder the weights (zero-copy loads keep them as file views)."""
    spec = spec if spec is not None else os.environ.get(ENV_KERNELS)
    override = parse_spec(spec) if spec else {}
    report = KernelReport()
    path = cache_path()
    entries = _read_cache(path)
    for fmt, shape in layer_shapes(model).items():
        if fmt in override or torch.device(device).type != "cpu":  # GPU: the reference (cuBLAS for products)
            choice, source = (override[fmt], "override") if fmt in override else (REFERENCE[fmt], "reference")
            measured = Measured(f"{fmt} kernels (decode/prefill)", "", f"{choice.decode}/{choice.prefill}", {}, source)
        else:
            measured, _ = _format_choice(fmt, shape, dtype, prompt_rows, entries, relayout)
        report.plan[fmt] = KernelChoice(*measured.choice.split("/"))
        report.details.append(measured)
    if any(m.source == "measured" for m in report.details):
        _write_cache(path, entries)
    return report


def choose_dtype(shape: tuple[int, int], prompt_rows: int, device: torch.device | str) -> Measured:
    """The 16-bit compute dtype for a model whose largest layer is `shape`: on CPU the faster of bfloat16 and
    float16, each with its best dense kernels, for a request of `prompt_rows` prompt tokens and DECODE_TOKENS
    decoded ones (prefill and decode both count); on a GPU bfloat16 where supported."""
    if torch.device(device).type != "cpu":
        ok = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return Measured("dtype", "", "bfloat16" if ok else "float16", {}, "reference")
    key = f"dtype|{shape[0]}x{shape[1]}|rows {prompt_rows}|{machine_key()}"
    path = cache_path()
    entries = _read_cache(path)
    names = ("bfloat16", "float16")
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("choice") in names and isinstance(entry.get("seconds"), dict):
        return Measured("dtype", key, entry["choice"], entry["seconds"], "cache")
    seconds = {
        name: _format_choice("dense", shape, WEIGHT_DTYPES[name], prompt_rows, entries, True)[1] for name in names
    }
    choice = min(seconds, key=seconds.get)
    entries[key] = {"choice": choice, "seconds": seconds, "at": datetime.now().isoformat(timespec="seconds")}
    _write_cache(path, entries)
    return Measured("dtype", key, choice, seconds, "measured")
