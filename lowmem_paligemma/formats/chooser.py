"""Kernels (and the 16-bit CPU compute dtype) chosen by timing them on the running machine, and remembered.

The machines this runs on differ: bf16 `torch.mv` was 1.3x faster than `F.linear` on an AMX Xeon and 2x
slower on an AVX512-BF16 EPYC; float16 GEMMs were 5x slower than bfloat16 on one and fp16 products the
fastest decode on the other. So at first use the runtime times each weight format's candidate kernels (the
format's `decode_kernels` / `prefill_kernels`, registry.py) on the model's own largest layer shape, for a decode
step (1 row) and a prefill (PREFILL_ROWS rows; that layer and its transpose in turn, as a model's layers follow
each other), in a second or two, keeps the fastest, and caches the choice in a
JSON file keyed by the CPU model and flags, the torch version, the thread count, the format, dtype and shape.

A busy machine must not decide for ever (a laptop is a busy machine; a cache once recorded an 11.9 ms decode
that takes 2.8 ms on a quiet machine, and five kernels at the same 12 ms: a scheduler quantum, not a kernel):
- candidates are timed in ROUNDS interleaved rounds, so a slow spell hits all of them alike, and each is
  rated by its fastest run (interference only ever adds time);
- a measurement is *noisy* when a candidate's runs spread by more than SPREAD_LIMIT (median over fastest), or
  when other processes used more than BUSY_LIMIT of the machine's CPU time while it ran (/proc/stat through
  psutil, minus this process's own);
- a noisy measurement decides this load only where a phase's winner beats the reference's kernel of that phase by
  more than noise could explain (DECISIVE); otherwise that phase keeps the reference's, so a busy machine neither
  flip-flops between choices from one run to the next nor keeps a bad one. It is never cached: the next load
  times again. `info --retune` (`retune=True`) times anew whatever the cache holds.
A cache entry is only trusted if it has exactly the expected form and timed every candidate available now; a
corrupt or foreign file is ignored and rewritten.

A layout kernel (dense `packed`: oneDNN's blocked layout) makes the load reorder every weight; the chooser times
that reorder on the same layer (`relayout packed`), and a load that says how many requests it serves
(`LoadOptions.requests`: the CLI's generate, 1) charges each request its share, so a one-answer load does not
pay seconds of reordering to save milliseconds. With `requests` None (a server, a library user) the fastest pair
per request wins.

Overrides, for ablations and for a user who knows better: `LOWMEM_PALIGEMMA_KERNELS` or the `kernels`
load option, e.g. "dense=linear/linear,int8=int8pack/dequant" (format=decode/prefill), or "reference" for
the reference kernels everywhere and nothing measured (an "auto" dtype is then the reference one, bfloat16).
`lowmem-paligemma info` shows what was chosen and the timings behind it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import defaults
from ..checkpoint.safetensors_io import WEIGHT_DTYPES, dtype_name
from ..errors import OptionError
from ..machine import cpu
from . import registry
from .base import KernelChoice, WeightFormat

ENV_KERNELS = "LOWMEM_PALIGEMMA_KERNELS"
ENV_CACHE = "LOWMEM_PALIGEMMA_CACHE"  # a directory; default $XDG_CACHE_HOME/lowmem_paligemma or ~/.cache/...
# 3: fastest-of-rounds timings, noisy measurements never cached; 4: prefills timed on two shapes in turn (older
# entries are re-timed)
CACHE_VERSION = 4
PREFILL_ROWS = 256  # about a 224-px prompt (256 image tokens + text)
DECODE_TOKENS = defaults.MAX_NEW_TOKENS  # a request's decode share when kernels and dtype are chosen
ROUNDS = 5  # interleaved timing rounds per candidate (after one warm-up call each)
MIN_SAMPLE_S = 0.002  # one timed sample repeats the call until it lasts this long (timer resolution, jitter)
SPREAD_LIMIT = 1.25  # a candidate whose median run is this much slower than its fastest: the timing is noisy
BUSY_LIMIT = 0.15  # other processes' share of the machine's CPU time during a measurement above which it is noisy
LOSING = 2.0  # a candidate this much slower than its phase's best after two rounds is timed no more
DECISIVE = 1.5  # a noisy measurement's winner is used only if the reference takes this much longer, else the reference
REFERENCE_DTYPE = "bfloat16"  # the 16-bit dtype when nothing is measured: float16's range is too narrow for some

Clock = Callable[[], float]


@dataclass(frozen=True)
class Measured:
    """One choice: which kernels for a format, or which dtype, and the timings behind it."""

    what: str  # "int8 kernels (decode/prefill)", "dtype", ...
    key: str  # the cache key
    choice: str
    seconds: dict[str, float]  # candidate -> fastest seconds (empty: one candidate, nothing to measure)
    source: str  # "measured" | "measured, noisy: not cached" | "cache" | "override" | "reference" | ...


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


def _phases(fmt: WeightFormat) -> dict[str, tuple[str, ...]]:
    """The timed parts of a choice: each phase's candidates, and the reorder into each layout at load."""
    return {"decode": fmt.decode_kernels, "prefill": fmt.prefill_kernels, "relayout": tuple(fmt.layouts)}


def _valid(fmt: WeightFormat, entry: Any) -> bool:
    """A cache entry of exactly the expected form, naming kernels that exist."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("choice"), str)
        or not isinstance(entry.get("seconds"), dict)
    ):
        return False
    decode, _, prefill = entry["choice"].partition("/")
    allowed = {f"{phase} {name}" for phase, names in _phases(fmt).items() for name in names}
    return (
        decode in fmt.decode_kernels
        and prefill in fmt.prefill_kernels
        and fmt.valid_choice(decode, prefill)
        and all(k in allowed and isinstance(v, (int, float)) and v > 0 for k, v in entry["seconds"].items())
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


@dataclass(frozen=True)
class Timing:
    seconds: dict[str, float]  # candidate -> fastest sample
    spread: dict[str, float]  # candidate -> median sample / fastest sample
    others_busy: float  # other processes' share of the machine's CPU time while timing (0..1)

    @property
    def noisy(self) -> bool:
        return self.others_busy > BUSY_LIMIT or any(s > SPREAD_LIMIT for s in self.spread.values())

    def why_noisy(self) -> str:
        worst = max(self.spread, key=self.spread.get, default=None)
        parts = []
        if worst is not None and self.spread[worst] > SPREAD_LIMIT:
            parts.append(f"{worst} runs spread {self.spread[worst]:.2f}x")
        if self.others_busy > BUSY_LIMIT:
            parts.append(f"other processes used {self.others_busy:.0%} of the CPU")
        return ", ".join(parts)


class _BusyMeter:
    """Other processes' share of the machine's CPU time over a span: system-wide busy time minus this process's."""

    def __init__(self) -> None:
        import psutil

        self._psutil, self._me = psutil, psutil.Process()
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        t = self._psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        mine = sum(self._me.cpu_times()[:2])  # user + system of every thread of this process
        return time.monotonic(), busy, mine

    def share(self) -> float:
        (t0, busy0, mine0), (t1, busy1, mine1) = self._start, self._read()
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        return max(0.0, (busy1 - busy0) - (mine1 - mine0)) / capacity if capacity > 0 else 0.0


def time_candidates(
    calls: dict[str, Callable[[], object]], clock: Clock = time.perf_counter, phase: Callable[[str], str] = lambda n: ""
) -> Timing:
    """Each call timed in ROUNDS interleaved rounds after a warm-up; `clock` is injectable for tests. After two
    rounds a candidate more than LOSING times slower than the best of its phase (`phase(name)`) is not timed again:
    it cannot win, and a slow candidate's rounds are most of the time a choice takes."""
    for call in calls.values():
        call()  # first-call allocations, oneDNN primitive creation
    meter = _BusyMeter()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(ROUNDS):
        for name, call in calls.items():
            if round_ >= 2 and min(samples[name]) > LOSING * min(
                min(s) for n, s in samples.items() if phase(n) == phase(name)
            ):
                continue
            n, t0 = 0, clock()
            while True:  # repeat short calls: one sample lasts at least MIN_SAMPLE_S
                call()
                n += 1
                elapsed = clock() - t0
                if elapsed >= MIN_SAMPLE_S:
                    break
            samples[name].append(elapsed / n)
    fastest = {name: min(s) for name, s in samples.items()}
    spread = {name: statistics.median(s) / fastest[name] if fastest[name] > 0 else 1.0 for name, s in samples.items()
              if len(s) == ROUNDS}  # fmt: skip
    return Timing(fastest, spread, meter.share())


def _measure(fmt: WeightFormat, shape: tuple[int, int], dtype: torch.dtype) -> Timing:
    """Every available candidate of both phases: {"decode linear": s, "prefill packed": s, ...}.

    A prefill is timed on the layer and its transpose in turn (an MLP's up and down projections; the layer alone
    where the format cannot hold the transpose), per layer: a model's prefill runs layers of different shapes one
    after the other, and oneDNN's int8 GEMM ran at 1.36x its one-shape time when two shapes alternated (by hand on
    AMD EPYC, 884 against 1200 GFLOP/s for our own), which a single layer timed again and again does not show."""
    layer = fmt.bench(shape, dtype)
    turn = (shape[1], shape[0])
    other = fmt.bench(turn, dtype) if turn != shape and fmt.accepts(*turn) else None
    calls = {}
    for phase, rows in (("decode", 1), ("prefill", PREFILL_ROWS)):
        x = torch.randn(rows, shape[1]).to(dtype)
        for name in _phases(fmt)[phase]:
            if name not in fmt.available_kernels(dtype):
                continue
            if phase == "prefill" and other is not None:
                y = torch.randn(rows, turn[1]).to(dtype)
                calls[f"{phase} {name}"] = lambda name=name, x=x, y=y: (layer(x, name), other(y, name))
            else:
                calls[f"{phase} {name}"] = lambda name=name, x=x: layer(x, name)
    with torch.inference_mode():
        timing = time_candidates(calls, phase=lambda name: name.split()[0])
    if other is not None:  # two layers a call: per layer, as the decode's
        timing = Timing({k: v / 2 if k.startswith("prefill") else v for k, v in timing.seconds.items()},
                        timing.spread, timing.others_busy)  # fmt: skip
    timed = {key.split()[1] for key in calls}
    relayout = {f"relayout {k}": v for k, v in fmt.relayout_seconds(shape, dtype).items() if k in timed}
    return Timing({**timing.seconds, **relayout}, timing.spread, timing.others_busy)


def _best(
    fmt: WeightFormat,
    seconds: dict[str, float],
    prompt_rows: int,
    relayout: bool = True,
    requests: int | None = None,
    layers: float = 1.0,
) -> KernelChoice:
    """The valid (decode, prefill) pair with the least time for a request: prefill + DECODE_TOKENS steps, plus,
    when the load will serve only `requests` requests (the CLI's generate: 1), its share of reordering the
    weights into the pair's layout (`layers` timed layers' worth). `relayout` False keeps the weights as loaded
    (zero-copy: they are views of the checkpoint file)."""

    def reorder(d: str, p: str) -> float:
        kernel = d if d in fmt.layouts else p if p in fmt.layouts else None
        return 0.0 if kernel is None or not requests else seconds.get(f"relayout {kernel}", 0.0) * layers / requests

    pairs = [
        (_request_seconds(seconds, d, p, prompt_rows) + reorder(d, p), d, p)
        for d in fmt.decode_kernels
        for p in fmt.prefill_kernels
        if fmt.valid_choice(d, p)
        and f"decode {d}" in seconds
        and f"prefill {p}" in seconds
        and (relayout or (d not in fmt.layouts and p not in fmt.layouts))
    ]
    _, decode, prefill = min(pairs)
    return KernelChoice(decode, prefill)


def _noisy_choice(
    fmt: WeightFormat,
    seconds: dict[str, float],
    prompt_rows: int,
    relayout: bool,
    requests: int | None,
    layers: float,
) -> KernelChoice:
    """A noisy measurement's choice: in each phase the reference's kernel, or a candidate that beats it by more than
    DECISIVE in that phase alone (so a decode kernel twice as fast is not given up because a prefill, which a
    request's time is mostly made of, shows no decisive winner); of those pairs, the best as `_best` rates them."""
    kept = {}
    for key, s in seconds.items():
        phase, name = key.split()
        reference = getattr(fmt.reference, phase, None)
        if reference is None or name == reference or seconds.get(f"{phase} {reference}", 0.0) > DECISIVE * s:
            kept[key] = s  # a relayout time, the reference, or a decisive winner
    return _best(fmt, kept, prompt_rows, relayout, requests, layers)


def _request_seconds(seconds: dict[str, float], decode: str, prefill: str, prompt_rows: int) -> float:
    return seconds[f"prefill {prefill}"] * prompt_rows / PREFILL_ROWS + DECODE_TOKENS * seconds[f"decode {decode}"]


# --- choosing ------------------------------------------------------------------------------------------------


def parse_spec(text: str) -> dict[str, KernelChoice]:
    """'int8=int8pack/dequant,dense=mv/linear' -> {format: KernelChoice}; 'reference' -> the reference kernels."""
    text = text.strip()
    if text == "reference":
        return {name: registry.get(name).reference for name in registry.names()}
    plan = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, rest = part.partition("=")
        decode, sep2, prefill = (s.strip() for s in rest.partition("/"))
        name = name.strip()
        if not sep or not sep2 or name not in registry.names():
            formats = ", ".join(registry.names())
            raise OptionError(f"kernel spec {part!r}: expected FORMAT=DECODE/PREFILL with FORMAT one of {formats}")
        fmt = registry.get(name)
        for phase, kernel in (("decode", decode), ("prefill", prefill)):
            if kernel not in _phases(fmt)[phase]:
                options = ", ".join(_phases(fmt)[phase])
                raise OptionError(f"kernel spec {part!r}: {name} {phase} kernel {kernel!r} is not one of {options}")
        if not fmt.valid_choice(decode, prefill):
            layout = fmt.layouts.get(decode) or fmt.layouts.get(prefill)
            raise OptionError(f"kernel spec {part!r}: the {layout} layout is the weight's, so both phases must use it")
        plan[name] = KernelChoice(decode, prefill)
    return plan


def _linear_shapes(model: nn.Module) -> Iterator[tuple[str, tuple[int, int]]]:
    """(format name, (out, in)) of each linear layer of `model` that has a weight format. Embeddings are left out:
    their logits take the decode kernel whatever is chosen, and their table is never reordered."""
    for module in model.modules():
        fmt = registry.of(module)
        if fmt is not None and hasattr(module, "in_features") and not hasattr(module, "lookup"):
            yield fmt.name, (module.out_features, module.in_features)


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Each weight format in `model` -> its largest linear layer's (out, in): the shape that dominates the time."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, shape in _linear_shapes(model):
        if name not in shapes or shape[0] * shape[1] > shapes[name][0] * shapes[name][1]:
            shapes[name] = shape
    return shapes


def format_weights(model: nn.Module) -> dict[str, int]:
    """Each weight format -> the weights of its linear layers in `model` (what a layout's reorder goes through)."""
    total: dict[str, int] = {}
    for name, (o, i) in _linear_shapes(model):
        total[name] = total.get(name, 0) + o * i
    return total


def _format_choice(
    fmt: WeightFormat,
    shape: tuple[int, int],
    dtype: torch.dtype,
    prompt_rows: int,
    entries: dict[str, Any],
    relayout: bool,
    retune: bool,
    requests: int | None = None,
    layers: float = 1.0,
) -> tuple[Measured, float]:
    """The format's best kernels, from the cache or timed now (then added to `entries` unless noisy), with the
    request time that pair takes on one layer (for comparing dtypes)."""
    what = f"{fmt.name} kernels (decode/prefill)"
    names = fmt.available_kernels(dtype)
    if len(names) == 1:  # nothing to measure or cache
        return Measured(what, "", f"{names[0]}/{names[0]}", {}, "the only candidate"), 0.0
    key = f"{fmt.name}|{dtype_name(dtype)}|{shape[0]}x{shape[1]}|rows {prompt_rows}|{machine_key()}"
    cached = entries.get(key)
    # An entry that did not time a candidate available now (a kernel added by an upgrade, or built since) is stale.
    candidates = {f"{phase} {n}" for phase, kernels in _phases(fmt).items() for n in kernels if n in names}
    if not retune and _valid(fmt, cached) and candidates <= set(cached["seconds"]):
        seconds, source = cached["seconds"], "cache"
        choice = _best(fmt, seconds, prompt_rows, relayout, requests, layers)
    else:
        timing = _measure(fmt, shape, dtype)
        seconds, source = timing.seconds, "measured"
        choice = _best(fmt, seconds, prompt_rows, relayout, requests, layers)
        if timing.noisy:
            choice = _noisy_choice(fmt, seconds, prompt_rows, relayout, requests, layers)
            source = f"measured, noisy ({timing.why_noisy()}): not cached, timed again next load"
        else:
            best = _best(fmt, seconds, prompt_rows)
            entries[key] = {"choice": str(best), "seconds": seconds, "spread": timing.spread,
                            "at": datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    return Measured(what, key, str(choice), seconds, source), _request_seconds(
        seconds, choice.decode, choice.prefill, prompt_rows
    )


def choose_kernels(
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device | str,
    spec: str | None = None,
    *,
    prompt_rows: int,
    relayout: bool = True,
    retune: bool = False,
    requests: int | None = None,
) -> KernelReport:
    """The kernel plan for `model` (built on meta is enough) on this machine; see the module docstring.
    `prompt_rows` weighs prefill against decode when a layout serves both; `relayout` False excludes kernels
    that reorder the weights (zero-copy loads keep them as file views); `retune` times anew, whatever is cached;
    `requests`, when the load serves that many requests only, charges a layout's reorder at load to them."""
    spec = spec if spec is not None else os.environ.get(ENV_KERNELS)
    override = parse_spec(spec) if spec else {}
    report = KernelReport()
    path = cache_path()
    entries = _read_cache(path)
    before = dict(entries)
    weights = format_weights(model)
    for name, shape in layer_shapes(model).items():
        fmt = registry.get(name)
        if name in override or torch.device(device).type != "cpu":  # GPU: the reference (cuBLAS for products)
            choice, source = (override[name], "override") if name in override else (fmt.reference, "reference")
            measured = Measured(f"{name} kernels (decode/prefill)", "", str(choice), {}, source)
        else:
            layers = weights[name] / (shape[0] * shape[1])  # the timed layer's reorder, scaled to the model's
            measured, _ = _format_choice(fmt, shape, dtype, prompt_rows, entries, relayout, retune, requests, layers)
        report.plan[name] = KernelChoice(*measured.choice.split("/"))
        report.details.append(measured)
    if entries != before:
        _write_cache(path, entries)
    return report


def choose_dtype(
    shape: tuple[int, int],
    prompt_rows: int,
    device: torch.device | str,
    retune: bool = False,
    spec: str | None = None,
) -> Measured:
    """The 16-bit compute dtype for a model whose largest layer is `shape`: on CPU the faster of bfloat16 and
    float16, each with its best dense kernels, for a request of `prompt_rows` prompt tokens and DECODE_TOKENS
    decoded ones (prefill and decode both count); on a GPU bfloat16 where supported. With the kernel spec
    "reference" (`spec`, or LOWMEM_PALIGEMMA_KERNELS) nothing is measured: bfloat16."""
    if torch.device(device).type != "cpu":
        ok = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return Measured("dtype", "", "bfloat16" if ok else "float16", {}, "reference")
    spec = spec if spec is not None else os.environ.get(ENV_KERNELS)
    if spec is not None and spec.strip() == "reference":
        return Measured("dtype", "", REFERENCE_DTYPE, {}, "reference")
    key = f"dtype|{shape[0]}x{shape[1]}|rows {prompt_rows}|{machine_key()}"
    path = cache_path()
    entries = _read_cache(path)
    names = ("bfloat16", "float16")
    entry = entries.get(key)
    if (
        not retune
        and isinstance(entry, dict)
        and entry.get("choice") in names
        and isinstance(entry.get("seconds"), dict)
    ):
        return Measured("dtype", key, entry["choice"], entry["seconds"], "cache")
    dense = registry.get("dense")
    measured = {
        name: _format_choice(dense, shape, WEIGHT_DTYPES[name], prompt_rows, entries, True, retune) for name in names
    }
    seconds = {name: request for name, (_, request) in measured.items()}
    choice = min(seconds, key=seconds.get)
    noisy = [m.source for m, _ in measured.values() if m.source.startswith("measured, noisy")]
    if noisy:
        source = "measured, noisy: not cached, timed again next load"
        choice = choice if seconds[REFERENCE_DTYPE] > DECISIVE * seconds[choice] else REFERENCE_DTYPE
    else:
        source = "measured"
        entries[key] = {"choice": choice, "seconds": seconds, "at": datetime.now().isoformat(timespec="seconds")}
    _write_cache(path, entries)
    return Measured("dtype", key, choice, seconds, source)
