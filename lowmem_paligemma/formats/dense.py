"""The dense format: weights in the model's dtype, as the checkpoint holds them (after a dtype conversion).

A linear layer's work differs by phase: a decode step feeds one row (or a few: a batch) and reads every
weight once, so it is bound by memory bandwidth; a prefill feeds hundreds of rows and is bound by compute.
Which kernel is fastest for each depends on the CPU (bf16 `torch.mv` was measured 1.3x faster than
`F.linear` on an AMX Xeon and 2x slower on an AVX512-BF16 EPYC), so the chooser times them (chooser.py):
- "linear": F.linear; the reference.
- "mv": torch.mv, one row only (F.linear otherwise).
- "packed": the weight reordered once into oneDNN's blocked layout, then `mkldnn._linear_pointwise`
  (measured 1.3x F.linear's bandwidth for one bf16 row on an AVX512-BF16 EPYC); a layout, so both phases use it.
- "native": our own decode kernel (native.cpp): the weight read once in its plain layout, widened in registers,
  fp32 sums; the memory wall on CPUs where torch's products fall short of it (decode only).
- "upcast": a prefill on a CPU whose 16-bit GEMM is slow (no AVX512-BF16: oneDNN emulates it at a fifth of the
  float32 rate): the layer's weight widened to float32 into a reused buffer (native.cpp's `widen_float32` where it
  built: stores that bypass the caches, as the buffer is larger than them), then a float32 GEMM. A 16-bit value is
  exact in float32, so every product is what the 16-bit GEMM computes; only the order of the sums differs.

Axes: M rows (batch x tokens), I in features, O out features.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .base import DECODE_ROWS, KernelChoice, LayerCall, Scratch, WeightFormat


def dense_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernels: KernelChoice,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """x (..., I) @ weight (O, I)^T + bias -> (..., O)."""
    if weight.is_mkldnn:  # the packed layout: its kernel, whatever the phase
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    rows = x.shape[:-1].numel()
    name = kernels.pick(rows)
    if name == "native" and rows <= DECODE_ROWS and x.device.type == "cpu" and (nk := native.kernels()) is not None:
        y = nk.gemv_dense(x, weight)
        return y if bias is None else y + bias
    if name == "upcast" and weight.dtype != torch.float32 and x.device.type == "cpu":
        wide = (scratch or Scratch()).get(tuple(weight.shape), torch.float32, weight.device)
        if (nk := native.kernels()) is not None and weight.is_contiguous():
            nk.widen_float32(weight, wide)  # the same values, streamed past the caches
        else:
            wide.copy_(weight)
        y = F.linear(x.float(), wide, None if bias is None else bias.float())
        return y.to(x.dtype)
    if rows == 1 and name == "mv" and x.device.type == "cpu":
        y = torch.mv(weight, x.reshape(-1))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A dense (O, I) weight in oneDNN's blocked layout for `_linear_pointwise` (raises where unsupported)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


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


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) computed by the chosen dense kernel."""

    FORMAT = "dense"
    kernels: KernelChoice = KernelChoice("linear", "linear")  # set per model by formats.kernels.use_kernels
    scratch: Scratch | None = None  # the model's shared buffers (formats.kernels.use_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias, self.kernels, self.scratch)


class Embedding(nn.Module):
    """A (rows, dim) table under the checkpoint's `.weight` key, created without nn.Embedding's random init:
    `normal_` on a meta tensor imports torch._dynamo, 0.9 s of every load (bench/load_memory.py found it).

    `lookup` gathers rows; `logits` is the tied output head, x @ table^T (the table read whole once a step).
    """

    FORMAT = "dense"
    kernels: KernelChoice = KernelChoice("linear", "linear")

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, None, self.kernels)


class DenseFormat(WeightFormat):
    name = "dense"
    quantizes = False
    decode_kernels = ("linear", "mv", "packed", "native")
    prefill_kernels = ("linear", "packed", "upcast")
    reference = KernelChoice("linear", "linear")
    layouts = {"packed": "onednn"}  # oneDNN's blocked layout (`mkldnn._reorder_linear_weight`)

    def linear(self, in_features: int, out_features: int, bias: bool, scratch: Scratch | None) -> nn.Module:
        return Linear(in_features, out_features, bias=bias)

    def embedding(self, rows: int, dim: int) -> nn.Module:
        return Embedding(rows, dim)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.to_dense().float() if module.weight.is_mkldnn else module.weight.float()

    @functools.cache  # noqa: B019 (one instance per format, alive for the process)
    def available_kernels(self, dtype: torch.dtype) -> tuple[str, ...]:
        """oneDNN packs float16 weights only with AVX512-FP16: 'packed' only where a probe packs; 'native' where
        our kernels built; 'upcast' for 16-bit weights."""
        names = set(super().available_kernels(dtype))
        try:
            pack_weight(torch.zeros(16, 16, dtype=dtype))
        except (RuntimeError, AttributeError):
            names.discard("packed")
        if native.kernels() is None:
            names.discard("native")
        if dtype == torch.float32:
            names.discard("upcast")
        return tuple(sorted(names))

    def bench(self, shape: tuple[int, int], dtype: torch.dtype) -> LayerCall:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        packed = pack_weight(w) if "packed" in self.available_kernels(dtype) else None
        scratch = Scratch()
        return lambda x, name: dense_linear(x, packed if name == "packed" else w, None, KernelChoice(name, name),
                                            scratch)  # fmt: skip

    def relayout_seconds(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, float]:
        """oneDNN's reorder of one layer into the packed layout (the fastest of two: the first builds the primitive)."""
        if "packed" not in self.available_kernels(dtype):
            return {}
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            pack_weight(w)
            times.append(time.perf_counter() - t0)
        return {"packed": min(times)}

    def scratch_bytes(self, modules: list[nn.Module], choice: KernelChoice, dtype: torch.dtype) -> int:
        """A float32 copy of the largest dense linear layer, when the chosen prefill widens into one."""
        if "upcast" not in (choice.decode, choice.prefill) or dtype == torch.float32:
            return 0
        return max((m.weight.numel() for m in modules if isinstance(m, Linear)), default=0) * 4

    def plain(self, choice: KernelChoice, dtype: torch.dtype) -> KernelChoice:
        """`choice` for a weight kept in the plain layout: a layout's kernel replaced by the plain one's."""
        if choice.decode not in self.layouts and choice.prefill not in self.layouts:
            return choice
        decode = "native" if "native" in self.available_kernels(dtype) else self.reference.decode
        return KernelChoice(decode if choice.decode in self.layouts else choice.decode,
                            self.reference.prefill if choice.prefill in self.layouts else choice.prefill)  # fmt: skip

    def use(self, module: nn.Module, choice: KernelChoice) -> None:
        """Reorder the weight into the layout `choice` needs (or back to the plain one); embeddings stay plain
        (their rows are gathered), so where the choice is a layout's kernel their logits take the fastest of the
        plain layout's (ours where it built: F.linear read the 257k x 2048 table at about half its rate,
        docs/performance.md))."""
        if not isinstance(module, Linear):
            module.kernels = self.plain(choice, module.weight.dtype)
            return
        module.kernels = choice
        packed = self.layouts.get(choice.decode) == "onednn"
        if packed != module.weight.is_mkldnn:
            w = pack_weight(module.weight) if packed else module.weight.to_dense()
            module.weight = nn.Parameter(w, requires_grad=False)
            release_freed_memory()


FORMAT = DenseFormat()
