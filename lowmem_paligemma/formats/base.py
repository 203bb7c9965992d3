"""What a weight format declares, and the small pieces every format shares.

A weight format is how a linear layer's weight is held in memory and multiplied: "dense" (the model's 16- or
32-bit dtype), "int8" (one scale per output row), "int4" (groups of 128). Each format is one module of this
package holding one `WeightFormat` subclass, registered in registry.py; every other place of the code asks the
registry instead of branching on a format's name:
- its storage: the parameters its layer classes declare (on meta, so every memory estimate reads them without
  loading: `weight_bytes`);
- how a stored float weight becomes it while the checkpoint streams: its layers' `row_fills()`
  (checkpoint.loader.RowFill), chunk by chunk, never a whole 16-bit copy;
- its layer classes (`linear`, `embedding`), and which shapes it can hold (`accepts`, else `fallback`);
- its kernels: the candidates for a decode step and a prefill (the chooser times them on the running machine,
  chooser.py), the reference pair, the layouts some kernels need, and a layer to time them on (`bench`);
- its compressed-tensors mapping (`compressed`, `stored_tensors`, `stored_rows`): how `convert --quantize`
  writes it and how a pre-quantized checkpoint's config block is recognised (compressed.py).

Axes: M rows (batch x tokens), I in features, O out features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.preflight import param_bytes

DECODE_ROWS = 16  # a product with at most this many rows is a decode step (one token per sequence, batch <= 16)


@dataclass(frozen=True)
class KernelChoice:
    decode: str  # kernel name for <= DECODE_ROWS rows
    prefill: str  # kernel name for more rows

    def pick(self, rows: int) -> str:
        return self.decode if rows <= DECODE_ROWS else self.prefill

    def __str__(self) -> str:
        return f"{self.decode}/{self.prefill}"


class Scratch:
    """Reused buffers for weights converted for a prefill's GEMM (int8 dequantized into 16 bits, 16-bit weights
    widened to float32), one per dtype, shared by all layers of a model: a prefill converts one layer at a time into
    it instead of allocating (and page-faulting) a fresh copy per layer."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        b = self._bufs.get((dtype, device))
        if b is None or b.numel() < n:
            self._bufs[dtype, device] = b = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)


@dataclass(frozen=True)
class CompressedScheme:
    """How compressed-tensors stores a format: its `format` name and the `weights` QuantizationArgs fields that
    identify it (written by `convert --quantize`, matched when a pre-quantized config.json is read)."""

    format: str  # "naive-quantized", "pack-quantized", ...
    weights: Mapping[str, Any]  # num_bits, type, symmetric, strategy, group_size, dynamic


def round_scale_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scales -> the nearest values of `dtype` at or above them (0 -> 1), as float32: the scale a kernel
    uses in `dtype` is then the one the weights were quantized against, and nothing clips."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rounded = scale.to(dtype)
    low = rounded.float() < scale
    if low.any():  # one step up: positive floats order like their bit patterns
        bits = {2: torch.int16, 4: torch.int32}[rounded.element_size()]
        rounded = torch.where(low, (rounded.view(bits) + 1).view(dtype), rounded)
    return rounded.float()


LayerCall = Callable[[torch.Tensor, str], torch.Tensor]  # (x, kernel name) -> x @ W^T, for the chooser's timings


class WeightFormat:
    """One weight format (see the module docstring). Subclasses set the class attributes and the layer hooks."""

    name: str  # the kernel spec's FORMAT, the layers' FORMAT, and the --quantize value when `quantizes`
    quantizes: bool = True  # offered as a --quantize mode (dense is what the checkpoint holds: no)
    decode_kernels: tuple[str, ...]  # candidates for <= DECODE_ROWS rows; the chooser times them
    prefill_kernels: tuple[str, ...]  # candidates for more rows
    reference: KernelChoice  # correct everywhere: the choice before any measurement, and on a GPU
    layouts: Mapping[str, str] = {}  # kernel -> the weight layout it needs (others: the plain one)
    fallback: str | None = None  # the format of layers this one cannot hold (`accepts` False)
    compressed: CompressedScheme | None = None  # None: `convert --quantize` cannot store it

    # --- layers ---------------------------------------------------------------------------------------------

    def accepts(self, out_features: int, in_features: int) -> bool:
        return True

    def linear(self, in_features: int, out_features: int, bias: bool, scratch: Scratch | None) -> nn.Module:
        raise NotImplementedError

    def embedding(self, rows: int, dim: int) -> nn.Module:
        """The tied embedding table: `lookup(ids)` gathers rows, `logits(x)` is x @ table^T."""
        raise NotImplementedError

    def weight_bytes(self, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        """Bytes one (out, in) layer's weight takes in memory with compute dtype `dtype` (its declared parameters)."""
        with torch.device("meta"):
            layer = self.linear(in_features, out_features, False, None)
        return sum(param_bytes(p, dtype) for p in layer.parameters())

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The float32 (O, I) weight a layer of this format computes with (tests and quality checks)."""
        raise NotImplementedError

    # --- kernels --------------------------------------------------------------------------------------------

    def valid_choice(self, decode: str, prefill: str) -> bool:
        """A weight has one layout: both phases' kernels must want the same one."""
        return self.layouts.get(decode, "plain") == self.layouts.get(prefill, "plain")

    def available_kernels(self, dtype: torch.dtype) -> tuple[str, ...]:
        """The candidates this machine can run in `dtype` (all of them unless a format says otherwise)."""
        return tuple(sorted({*self.decode_kernels, *self.prefill_kernels}))

    def bench(self, shape: tuple[int, int], dtype: torch.dtype) -> LayerCall:
        """A random (out, in) layer of this format in `dtype`, as a call the chooser can time per kernel."""
        raise NotImplementedError

    def relayout_seconds(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, float]:
        """Seconds to put one (out, in) layer into each layout kernel's layout ({kernel: s}), what a load pays per
        layer for choosing it (none without layouts)."""
        return {}

    def use(self, module: nn.Module, choice: KernelChoice) -> None:
        """Give a loaded layer its kernels, putting its weight in the layout they need."""
        module.kernels = choice

    def scratch_bytes(self, modules: list[nn.Module], choice: KernelChoice, dtype: torch.dtype) -> int:
        """Bytes of a shared buffer the chosen kernels need for these layers (ops' Scratch), 0 if none."""
        return 0

    # --- compressed-tensors (formats with `compressed` set) --------------------------------------------------

    def stored_tensors(
        self, out_features: int, in_features: int, dtype: torch.dtype
    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """What one layer stores: {local name: (dtype, shape)}, in the order written."""
        raise NotImplementedError

    def stored_rows(self, rows: torch.Tensor, leaf: str, dtype: torch.dtype) -> torch.Tensor:
        """The rows of stored tensor `leaf` computed from float weight rows (n, I), for a model in `dtype`."""
        raise NotImplementedError

    def stored_constants(self, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        """The stored tensors that are not computed from weight rows (e.g. int4's `weight_shape`)."""
        return {}
