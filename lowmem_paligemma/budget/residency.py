"""Which layers stay in memory under a budget, and which are read from the checkpoint for every forward.

A memory budget (`--max-memory`, `max_memory=`) is the peak RSS the whole process may reach. The plan is made
on the meta model, from parameter shapes and checkpoint headers, before anything is allocated:
- always held: the weights outside the layers (the tied embedding / logits table, the projector, norms, the
  patch and position embeddings), the request (KV cache for prompt + new tokens and the prefill's
  activations, memory.request_bytes), this process as it is now (interpreter, torch, tokenizer: its RSS is
  measured), the kernel buffers where a kernel uses one (`scratch_bytes`), and a little allocator slack;
- streamed: layers (Gemma decoder layers, SigLIP encoder layers) that do not fit. They are read into a pool
  of `buffers` layer-sized buffers, the next one read while the current one computes (streamer.py);
- the rest of the budget keeps layers resident. A decoder layer is read once per generated token, a vision
  layer once per image, so decoder layers are kept first and the vision tower is streamed first. Resident
  decoder layers are spread evenly through the stack, so every streamed read has resident compute to hide
  behind.
The minimum budget is everything held always, every layer streamed, and one layer in flight; below it
`plan_residency` raises `InsufficientMemoryError` naming the minimum, before anything large exists.
docs/streaming.md explains the numbers and what streaming costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import defaults
from ..checkpoint.loader import READ_WORKERS, LoadPlan
from ..checkpoint.pagecache import DIRECT_ALIGN
from ..checkpoint.preflight import model_bytes, param_bytes
from ..errors import InsufficientMemoryError
from ..formats import registry
from ..formats.base import KernelChoice
from ..model.gemma import GemmaDecoderLayer
from ..model.siglip import SiglipEncoderLayer
from ..profiling.profiler import current_rss
from ..units import format_bytes
from .layout import layer_layout

RUN_SLACK_BYTES = 64 << 20  # allocator rounding, oneDNN's primitive caches, sampling: measured in tests
STREAM_BUFFERS = 2  # one layer computing, the next one being read
# What a plan always holds besides the slack and the kernel buffers (ResidencyPlan.parts' keys).
OUTSIDE, REQUEST, PROCESS = "weights outside the layers", "request (KV cache, activations)", "process now"
KERNEL_BUFFERS = "kernel buffers"  # formats.base.Scratch: int8 dequantized to 16 bits, 16-bit weights widened
GROUPS = {GemmaDecoderLayer: "decoder", SiglipEncoderLayer: "vision"}  # the layers that can be streamed


# --- the units: layers that can be streamed ------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One layer that can be streamed: all its parameters travel together."""

    name: str  # module name, e.g. "language_model.model.layers.3"
    group: str  # "vision" (read once per image) or "decoder" (once per forward)
    nbytes: int  # its parameters in memory (model dtype, or quantized)
    buffer_bytes: int  # a buffer that can hold it: nbytes plus alignment for direct reads (streamer.py)
    stored_bytes: int  # bytes read from the checkpoint per pass
    staging_bytes: int  # staging and temporaries while it is read: converted to another dtype or quantized (else 0)

    @property
    def converts(self) -> bool:
        return self.staging_bytes > 0


def streamable_units(model: nn.Module, dtype: torch.dtype, load_plan: LoadPlan | None = None) -> list[Unit]:
    """The model's layers in execution order (vision tower, then decoder); stored sizes from `load_plan`
    (the checkpoint headers) where given, else the in-memory sizes."""
    units = []
    for name, module in model.named_modules():
        group = GROUPS.get(type(module))
        if group is None:
            continue
        params = {f"{name}.{n}": p for n, p in module.named_parameters()}
        nbytes = sum(param_bytes(p, dtype) for p in params.values())
        # Without the checkpoint: every tensor might be a span of its own, with an aligned block either side.
        stored, buffer, staging = nbytes, nbytes + 2 * DIRECT_ALIGN * len(params), 0
        if load_plan is not None:
            final = {n: torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device="meta")
                     for n, p in params.items()}  # fmt: skip
            layout = layer_layout(final, load_plan.restrict(params))
            stored, buffer = layout.stored, layout.nbytes
            staged = [e for e, _ in layout.copies] + [e for e, _ in layout.fills]
            if staged:  # each reader's staging holds a chunk of at most its share, or the largest tensor
                per_reader = min(
                    defaults.STAGING_BYTES // READ_WORKERS, max(e.nbytes for e in staged) + 2 * DIRECT_ALIGN
                )
                staging = 2 * READ_WORKERS * per_reader  # and the conversion's temporaries as much again
        units.append(Unit(name, group, nbytes, buffer, stored, staging))
    return sorted(units, key=lambda u: u.group != "vision")  # stable: layer order within each group


def spread(n: int, k: int) -> list[int]:
    """k of n indices, evenly spaced (k = 4, n = 18: [2, 6, 11, 15])."""
    return [int((i + 0.5) * n / k) for i in range(k)] if k else []


# --- the plan ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidencyPlan:
    budget: int
    parts: dict[str, int]  # what is always held, by what it is
    units: tuple[Unit, ...]  # every streamable layer, in execution order
    streamed: tuple[str, ...]  # the units read per pass, in execution order
    buffers: int  # layer buffers in the pool (0: nothing streamed)
    buffer_bytes: int  # one buffer
    staging_bytes: int  # the readers' staging and quantization temporaries (0 unless a streamed layer converts)
    minimum: int  # the smallest budget that runs: every layer streamed, one in flight

    @property
    def resident_units(self) -> list[Unit]:
        return [u for u in self.units if u.name not in self.streamed]

    @property
    def streamed_units(self) -> list[Unit]:
        return [u for u in self.units if u.name in self.streamed]

    @property
    def total(self) -> int:
        """The planned peak: always-held parts, resident layers, the pool and the staging."""
        resident = sum(u.nbytes for u in self.resident_units)
        return sum(self.parts.values()) + resident + self.buffers * self.buffer_bytes + self.staging_bytes

    def read_per_pass(self, group: str) -> int:
        """Checkpoint bytes read per pass of `group` ("decoder": per forward, i.e. per token; "vision": per image)."""
        return sum(u.stored_bytes for u in self.streamed_units if u.group == group)

    def streamed_parameters(self, model: nn.Module) -> set[str]:
        """Full names of the parameters that stay on meta at load (the streamed layers')."""
        return {f"{u}.{n}" for u in self.streamed for n, _ in model.get_submodule(u).named_parameters()}

    def describe(self, read_rate: float | None = None) -> list[str]:
        """A few lines for stderr: what stays, what streams, what a token costs at `read_rate` (bytes/s)."""
        held = ", ".join(f"{what} {format_bytes(n)}" for what, n in self.parts.items())
        lines = [
            f"memory budget {format_bytes(self.budget)}: planned peak {format_bytes(self.total)} "
            f"(minimum {format_bytes(self.minimum)})",
            f"  always held: {held}",
        ]
        for group, per in (("decoder", "token"), ("vision", "image")):
            units = [u for u in self.units if u.group == group]
            if not units:
                continue
            kept = [i for i, u in enumerate(units) if u.name not in self.streamed]
            shown = "all" if len(kept) == len(units) else f"{len(kept)} of {len(units)}"
            where = f" ({', '.join(map(str, kept))})" if 0 < len(kept) < len(units) else ""
            line = f"  {group} layers: {shown} resident{where}"
            if len(kept) < len(units):
                how = " (converted or quantized as read)" if any(u.converts for u in units) else ""
                line += f"; {format_bytes(self.read_per_pass(group))} read per {per}{how}"
            lines.append(line)
        if self.streamed:
            lines.append(
                f"  streaming through {self.buffers} buffer(s) of {format_bytes(self.buffer_bytes)}"
                + (" (one computing, one being read)" if self.buffers > 1 else " (no read-ahead: the budget holds one)")
            )
        per_token = self.read_per_pass("decoder")
        if per_token and read_rate:
            how = " and converted" if any(u.converts for u in self.streamed_units) else ""
            lines.append(
                f"  first layer read{how} at {format_bytes(read_rate)}/s: at least {per_token / read_rate:.2f} s per "
                "token for the reads"
            )
        return lines


def _fit(units: list[Unit], room: int, buffers: int) -> list[Unit] | None:
    """The streamed units when as many layers as fit in `room` stay resident and `buffers` buffers carry the
    rest, or None if even streaming every layer does not fit."""
    decoder = [u for u in units if u.group == "decoder"]
    vision = [u for u in units if u.group == "vision"]
    for k in range(len(units), -1, -1):  # resident count, most first; decoder layers are kept before vision ones
        kept = {decoder[i].name for i in spread(len(decoder), min(k, len(decoder)))}
        kept |= {u.name for u in vision[: max(0, k - len(decoder))]}
        streamed = [u for u in units if u.name not in kept]
        used = sum(u.nbytes for u in units if u.name in kept)
        if streamed:
            used += min(buffers, len(streamed)) * max(u.buffer_bytes for u in streamed)
            used += max(u.staging_bytes for u in streamed)
        if used <= room:
            return streamed
    return None


def plan_residency(
    model: nn.Module,
    budget: int,
    dtype: torch.dtype,
    request: int,
    *,
    load_plan: LoadPlan | None = None,
    process_bytes: int | None = None,
    scratch: int = 0,
) -> ResidencyPlan:
    """The residency plan for `model` (on meta) in `budget` bytes of peak RSS, in `dtype`, for a request needing
    `request` bytes (memory.request_bytes(...).total). `load_plan`: the checkpoint matched to the model (stored
    sizes, dtype conversion); `process_bytes`: this process's RSS now (None: measured); `scratch`: the
    kernel buffers the chosen kernels use (`scratch_bytes`). Two buffers where the budget holds them (one layer
    computing, the next being read), else one. Raises InsufficientMemoryError below the minimum, naming it."""
    if process_bytes is None:
        process_bytes = current_rss()["rss"]
    units = streamable_units(model, dtype, load_plan)
    in_units = {f"{u.name}.{n}" for u in units for n, _ in model.get_submodule(u.name).named_parameters()}
    parts = {OUTSIDE: model_bytes(model, dtype, exclude=in_units), REQUEST: request, PROCESS: process_bytes,
             "slack": RUN_SLACK_BYTES}  # fmt: skip
    if scratch:
        parts[KERNEL_BUFFERS] = scratch
    fixed = sum(parts.values())
    in_flight = max((u.buffer_bytes for u in units), default=0)
    in_flight += max((u.staging_bytes for u in units), default=0)
    minimum = fixed + in_flight
    streamed: list[Unit] | None = []
    buffers = 0
    if fixed + sum(u.nbytes for u in units) > budget:
        for buffers in (STREAM_BUFFERS, 1):
            streamed = _fit(units, budget - fixed, buffers)
            if streamed is not None:
                break
    if streamed is None:
        raise InsufficientMemoryError(
            f"memory budget {format_bytes(budget)} is below the minimum {format_bytes(minimum)} for this model and "
            f"request (process {format_bytes(process_bytes)}, weights outside the layers {format_bytes(parts[OUTSIDE])}"
            f", request {format_bytes(request)}, one layer in flight {format_bytes(in_flight)}); raise --max-memory "
            "or quantize (--quantize int8 / int4)"
        )
    return ResidencyPlan(
        budget=budget,
        parts=parts,
        units=tuple(units),
        streamed=tuple(u.name for u in streamed),
        buffers=min(buffers, len(streamed)),
        buffer_bytes=max((u.buffer_bytes for u in streamed), default=0),
        staging_bytes=max((u.staging_bytes for u in streamed), default=0),
        minimum=minimum,
    )


def scratch_bytes(model: nn.Module, kernel_plan: dict[str, KernelChoice], dtype: torch.dtype) -> int:
    """The shared buffers the chosen kernels need beside the weights (formats.base.Scratch: int8's dequantization
    into 16 bits), as each format in `kernel_plan` sizes them for its layers."""
    layers: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        if (fmt := registry.of(module)) is not None:
            layers.setdefault(fmt.name, []).append(module)
    return sum(
        registry.get(name).scratch_bytes(layers.get(name, []), choice, dtype) for name, choice in kernel_plan.items()
    )
