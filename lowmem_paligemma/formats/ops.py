"""Linear layers and embedding tables, dense or quantized, each computed by the kernel chosen for the machine.

A linear layer's work differs by phase: a decode step feeds one row (or a few: a batch) and reads every
weight once, so it is bound by memory bandwidth; a prefill feeds hundreds of rows and is bound by compute.
Which kernel is fastest for each depends on the CPU (bf16 `torch.mv` was measured 1.3x faster than
`F.linear` on an AMX Xeon and 2x slower on an AVX512-BF16 EPYC), so nothing here is hard-coded: every
layer holds a `KernelChoice` (decode, prefill) for its weight format, set by kernels.py from measurements
on the running machine. The defaults below are the reference kernels, correct everywhere.

Weight formats (the quantization itself is quant.py):
- "dense": the model dtype. Kernels: "linear" (F.linear), "mv" (torch.mv, one row only; F.linear otherwise),
  "packed" (the weight reordered once into oneDNN's blocked layout, then `mkldnn._linear_pointwise`: measured
  1.3x F.linear's bandwidth for one bf16 row on an AVX512-BF16 EPYC; a layout, so both phases use it).
- "int8": int8 (O, I) + one scale per output row. Kernels: "int8pack" (torch's `_weight_int8pack_mm`,
  weight-only), "dequant" (into a reused 16-bit buffer, then F.linear), "int_mm" (activations quantized
  per row on the fly, int8 x int8 -> int32 `torch._int_mm`, VNNI / AMX-INT8 where the CPU has them).
- "int4": 4-bit groups in torch's CPU int4 layout + (scale, zero) per group. Kernel: "int4pack"
  (`_weight_int4pack_mm_for_cpu`), the only one that reads that layout.
The private torch kernels crash (not raise) on shapes they do not support, so each is used only where its
shape rules hold (`_int8pack_ok`, the int4 rules in quant.py) and the reference kernel is used otherwise.

Axes: M rows (batch x tokens), I in features, O out features.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DECODE_ROWS = 16  # a product with at most this many rows is a decode step (one token per sequence, batch <= 16)


@dataclass(frozen=True)
class KernelChoice:
    decode: str  # kernel name for <= DECODE_ROWS rows
    prefill: str  # kernel name for more rows

    def pick(self, rows: int) -> str:
        return self.decode if rows <= DECODE_ROWS else self.prefill


# The candidates of each format (kernels.py measures them) and the reference choice used before any measurement.
CANDIDATES: dict[str, dict[str, tuple[str, ...]]] = {
    "dense": {"decode": ("linear", "mv", "packed"), "prefill": ("linear", "packed")},
    "int8": {"decode": ("int8pack", "dequant"), "prefill": ("dequant", "int_mm", "int8pack")},
    "int4": {"decode": ("int4pack",), "prefill": ("int4pack",)},
}
# Kernels that need the weight in a layout of their own; a choice must use one layout for both phases.
LAYOUTS = {"packed": "onednn"}  # oneDNN's blocked layout (`mkldnn._reorder_linear_weight`), else plain


def valid_choice(decode: str, prefill: str) -> bool:
    return LAYOUTS.get(decode, "plain") == LAYOUTS.get(prefill, "plain")


REFERENCE = {"dense": KernelChoice("linear", "linear"), "int8": KernelChoice("dequant", "dequant"),
             "int4": KernelChoice("int4pack", "int4pack")}  # fmt: skip


class Scratch:
    """One reused buffer for dequantized weights, shared by all layers of a model: a prefill dequantizes one
    layer at a time into it instead of allocating (and page-faulting) a fresh 16-bit copy per layer."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        b = self._buf
        if b is None or b.numel() < n or b.dtype != dtype or b.device != device:
            self._buf = b = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)


# --- dense ---------------------------------------------------------------------------------------------------


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernels: KernelChoice):
    """x (..., I) @ weight (O, I)^T + bias -> (..., O)."""
    if weight.is_mkldnn:  # the packed layout: its kernel, whatever the phase
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    rows = x.shape[:-1].numel()
    if rows == 1 and kernels.pick(rows) == "mv" and x.device.type == "cpu":
        y = torch.mv(weight, x.reshape(-1))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) computed by the chosen dense kernel."""

    FORMAT = "dense"
    kernels: KernelChoice = REFERENCE["dense"]  # set per model by `use_kernels`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias, self.kernels)


class Embedding(nn.Module):
    """A (rows, dim) table under the checkpoint's `.weight` key, created without nn.Embedding's random init:
    `normal_` on a meta tensor imports torch._dynamo, 0.9 s of every load (bench/load_memory.py found it).

    `lookup` gathers rows; `logits` is the tied output head, x @ table^T (the table read whole once a step).
    """

    FORMAT = "dense"
    kernels: KernelChoice = REFERENCE["dense"]

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, None, self.kernels)


# --- int8 ----------------------------------------------------------------------------------------------------


def _int8pack_ok(x: torch.Tensor, q: torch.Tensor) -> bool:
    # _weight_int8pack_mm (CPU) was seen to segfault for in-features not a multiple of 16.
    return x.device.type == "cpu" and q.shape[1] % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (O, I) = q * scale[:, None], rounded to out's dtype (a 16-bit product keeps 8 or 11 bits)."""
    out.copy_(q)
    return out.mul_(scale.to(out.dtype)[:, None])


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    kernels: KernelChoice,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """x (..., I) @ (q (O, I) int8 * scale (O,) or (O, 1))^T + bias -> (..., O) in x's dtype."""
    rows, (o, i), scale = x.shape[:-1].numel(), q.shape, scale.view(-1)
    name = kernels.pick(rows)
    x2 = x.reshape(rows, i)
    if name == "int8pack" and _int8pack_ok(x, q):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
    elif name == "int_mm" and x.device.type == "cpu" and rows > DECODE_ROWS and i % 8 == 0:
        # Symmetric per-row activation scales; the int32 product is exact, the two scales are applied after.
        xf = x2.float()
        x_scale = xf.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127  # (M, 1)
        xq = torch.round(xf / x_scale).to(torch.int8)
        y = torch._int_mm(xq, q.t()).float().mul_(x_scale).mul_(scale.float()).to(x.dtype)
    else:
        w = (scratch or Scratch()).get((o, i), x.dtype, x.device)
        y = F.linear(x2, dequantize_int8(q, scale, w))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], o)


# --- int4 ----------------------------------------------------------------------------------------------------


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., I) @ W^T + bias with W in torch's CPU int4 layout: packed (O, I/2) uint8, scale_zeros (I/g, O, 2)."""
    rows, o = x.shape[:-1].numel(), packed.shape[0]
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scale_zeros.to(x.dtype))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], o)


def release_freed_memory() -> None:
    """Hand memory freed inside the allocator back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Replacing each weight by its reordered copy frees the old one; glibc keeps freed blocks below its mmap
    threshold in its arenas (measured: +0.5 GB of RSS after reordering PaliGemma-3B's layers once a tokenizer
    had run), so the freed memory is returned after each replacement.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A dense (O, I) weight in oneDNN's blocked layout for `_linear_pointwise` (raises where unsupported)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _relayout(module: Linear, choice: KernelChoice) -> None:
    """Reorder a dense layer's weight into the layout `choice` needs (or back to the plain one)."""
    packed = LAYOUTS.get(choice.decode) == "onednn"
    if packed != module.weight.is_mkldnn:
        w = pack_weight(module.weight) if packed else module.weight.to_dense()
        module.weight = nn.Parameter(w, requires_grad=False)
        release_freed_memory()


def relayout_as_loaded(model: nn.Module, plan: dict[str, KernelChoice]) -> Callable[[str], None]:
    """A loader `finish` hook: reorders each dense weight as soon as it is loaded, so the reordering runs
    beside the remaining reads instead of after them (loader.stream_into). `use_kernels` does the rest."""
    modules = dict(model.named_modules())

    def finish(param: str) -> None:
        name, _, leaf = param.rpartition(".")
        module = modules.get(name)
        if leaf == "weight" and isinstance(module, Linear) and module.FORMAT in plan:
            _relayout(module, plan[module.FORMAT])

    return finish


def use_kernels(model: nn.Module, plan: dict[str, KernelChoice]) -> None:
    """Give every layer of `model` the kernel choice for its weight format (formats missing from `plan` keep
    theirs), reordering dense weights into the layout the choice needs, one layer at a time. A per-model
    setting, not a global one: two models in one process can differ.

    A layer whose weight is still on meta is streamed in per forward (residency.py): its bytes arrive in the
    checkpoint's plain layout each time, so it takes the reference kernels where the choice needs a layout."""
    for module in model.modules():
        fmt = getattr(module, "FORMAT", None)
        if fmt not in plan:
            continue
        choice = plan[fmt]
        streamed = any(p.is_meta for p in module.parameters(recurse=False))
        if streamed and (choice.decode in LAYOUTS or choice.prefill in LAYOUTS):
            choice = REFERENCE[fmt]
        module.kernels = choice
        if isinstance(module, Linear) and not streamed:
            _relayout(module, plan[fmt])
