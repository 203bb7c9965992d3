"""The int4 format: symmetric groups of GROUP along the input, in torch's CPU int4 layout.

scale = max|w| / 7.5 rounded *up* to the model dtype, q = round(w / scale) clamped to [-8, 7] (compressed-tensors'
symmetric rule). Held for `_weight_int4pack_mm_for_cpu`: `weight_int4` (O, I/2) uint8 and `weight_scale_zeros`
(I/g, O, 2) with zero 0, so w = (q + 8 - 8) * scale. That layout depends on the CPU's vector width, so it is built
at load time, 64 rows at a time (its block), and never written to a file: a pre-quantized checkpoint stores
compressed-tensors' "pack-quantized" layout (`weight_packed` (O, I/8) int32, `weight_scale` (O, I/g),
`weight_shape` [O, I]), unpacked and repacked while streaming.

The kernel's shape rules (`accepts`: out features a multiple of 16, in features of the group) hold for every
PaliGemma layer but SigLIP's second MLP layer (4304-wide input, no group size the kernel takes): it falls back to
int8. The embedding's lookup reads rows out of the kernel's layout (`int4_rows`).

compressed-tensors' int32 packing: a row's value j is the nibble q + 8 at bits 4 * (j % 8) of word j // 8: on a
little-endian host, byte j // 2, low nibble first.

Axes: M rows (batch x tokens), I in features, O out features.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from ..checkpoint.loader import RowFill
from ..checkpoint.safetensors_io import FLOAT_DTYPES
from ..errors import CheckpointError
from .base import CompressedScheme, KernelChoice, LayerCall, Scratch, WeightFormat, round_scale_up

GROUP = 128  # compressed-tensors' and gpt-fast's default; every PaliGemma decoder width is a multiple
BLOCK_ROWS = 64  # torch's CPU int4 layout packs blocks of 64 rows: fills must start on a block
PER_INT32 = 8  # values in one compressed-tensors int32 word


def quantize_int4(w: torch.Tensor, dtype: torch.dtype, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, I) -> q (n, I) int32 in [-8, 7], scale (n, I / group) in `dtype`."""
    n, i = w.shape
    g = w.float().view(n, i // group, group)
    scale = round_scale_up(g.abs().amax(2) / 7.5, dtype)
    q = torch.round(g / scale[..., None]).clamp_(-8, 7).to(torch.int32)
    return q.view(n, i), scale.to(dtype)


def int4_kernel_ok(out_features: int, in_features: int, group: int = GROUP) -> bool:
    """Shapes `_weight_int4pack_mm_for_cpu` takes (it crashes or raises on others)."""
    return out_features % 16 == 0 and in_features % group == 0 and group in (32, 64, 128, 256)


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


@functools.cache
def _nibble_order(rows: int, cols: int) -> torch.Tensor:
    """Where torch's CPU int4 layout puts each value of a `rows` x `cols` block (rows <= 64): (rows * cols,)
    nibble indices (byte * 2 + high nibble), row-major. The layout depends on the CPU's vector width, so it is
    read off the packing function itself: five packs of a probe whose nibbles spell each value's own index."""
    index = torch.arange(rows * cols, dtype=torch.int64).view(rows, cols)
    found = torch.zeros(rows * cols, dtype=torch.int64)
    for digit in range((rows * cols - 1).bit_length() // 4 + 1):
        probe = ((index >> (4 * digit)) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1)
        nibbles = torch.stack([packed & 15, packed >> 4], 1).view(-1).to(torch.int64)
        found |= nibbles << (4 * digit)
    order = torch.empty_like(found)
    order[found] = torch.arange(rows * cols)
    return order


def int4_rows(packed: torch.Tensor, scale_zeros: torch.Tensor, group: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of an int4 weight held in torch's CPU layout, dequantized: (*ids.shape, I)."""
    n, cols = packed.shape[0], packed.shape[1] * 2
    flat, shape = packed.view(-1), ids.shape
    ids = ids.reshape(-1)
    block, row = ids // BLOCK_ROWS, ids % BLOCK_ROWS
    out = torch.empty(len(ids), cols, dtype=scale_zeros.dtype, device=packed.device)
    for size in {min(BLOCK_ROWS, n - int(b) * BLOCK_ROWS) for b in block.unique()}:
        pick = (torch.minimum(n - block * BLOCK_ROWS, torch.tensor(BLOCK_ROWS)) == size).nonzero()[:, 0]
        where = _nibble_order(size, cols).view(size, cols)[row[pick]]  # (k, I) nibble indices in the block
        where = where + (block[pick] * BLOCK_ROWS * cols)[:, None]  # ... in the tensor
        q = (flat[where // 2] >> ((where % 2) * 4).to(torch.uint8)) & 15
        scale = scale_zeros[:, ids[pick], 0].t().repeat_interleave(group, 1)  # (k, I)
        out[pick] = ((q.float() - 8) * scale.float()).to(out.dtype)  # exact product, rounded once
    return out.view(*shape, cols)


class Int4Linear(nn.Module):
    FORMAT = "int4"
    kernels: KernelChoice = KernelChoice("int4pack", "int4pack")

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = GROUP):
        super().__init__()
        if not int4_kernel_ok(out_features, in_features, group):
            raise ValueError(f"int4 needs out % 16 == 0 and in % {group} == 0, got {out_features} x {in_features}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.weight_int4 = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False
        )
        self.weight_scale_zeros = nn.Parameter(torch.empty(in_features // group, out_features, 2), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.weight_int4, self.weight_scale_zeros, self.group, self.bias)

    def row_fills(self) -> dict[str, RowFill]:
        """A stored float `weight` is quantized as it streams; a pre-quantized layer (compressed-tensors'
        `weight_packed` (O, I/8) int32, `weight_scale` (O, I/g), `weight_shape`) is repacked as it streams."""
        o, i, block, packed = self.out_features, self.in_features, BLOCK_ROWS, ("weight_int4",)
        return {
            "weight": RowFill((o, i), self._fill, ("weight_int4", "weight_scale_zeros"), block, FLOAT_DTYPES),
            "weight_packed": RowFill((o, i // PER_INT32), self._fill_packed, packed, block, (torch.int32,)),
            "weight_scale": RowFill((o, i // self.group), self._fill_scale, ("weight_scale_zeros",), 1, FLOAT_DTYPES),
            "weight_shape": RowFill((2,), self._check_shape, (), 2, (torch.int64,)),
        }

    def _fill(self, rows: torch.Tensor, start: int) -> None:
        q, scale = quantize_int4(rows, self.weight_scale_zeros.dtype, self.group)
        self._pack(q, start)
        self._fill_scale(scale, start)

    def _pack(self, q: torch.Tensor, start: int) -> None:
        """q (n, I) int32 in [-8, 7] -> rows start.. of torch's CPU layout (unsigned nibbles q + 8)."""
        self.weight_int4[start : start + len(q)] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q + 8, 1)

    def _fill_packed(self, packed: torch.Tensor, start: int) -> None:
        self._pack(unpack_int4(packed), start)

    def _fill_scale(self, scale: torch.Tensor, start: int) -> None:
        n = len(scale)  # scale (n, I/g): one per group of a row
        self.weight_scale_zeros[:, start : start + n, 0] = scale.t()
        self.weight_scale_zeros[:, start : start + n, 1] = 0

    def _check_shape(self, shape: torch.Tensor, start: int) -> None:
        want = [self.out_features, self.in_features]
        if shape.tolist() != want:
            raise CheckpointError(f"a stored weight_shape holds {shape.tolist()}, its int4 layer is {want}")


class Int4Embedding(Int4Linear):
    """The tied embedding in int4: `lookup` gathers and dequantizes rows out of the kernel's layout, `logits`
    reads the table through the int4 kernel."""

    def __init__(self, rows: int, dim: int):
        super().__init__(dim, rows, bias=False)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return int4_rows(self.weight_int4, self.weight_scale_zeros, self.group, ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


class Int4Format(WeightFormat):
    name = "int4"
    decode_kernels = ("int4pack",)
    prefill_kernels = ("int4pack",)
    reference = KernelChoice("int4pack", "int4pack")
    fallback = "int8"
    cpu_only = True
    compressed = CompressedScheme(
        "pack-quantized",
        {"num_bits": 4, "type": "int", "symmetric": True, "group_size": GROUP, "strategy": "group", "dynamic": False},
    )

    def accepts(self, out_features: int, in_features: int) -> bool:
        return int4_kernel_ok(out_features, in_features)

    def linear(self, in_features: int, out_features: int, bias: bool, scratch: Scratch | None) -> nn.Module:
        return Int4Linear(in_features, out_features, bias)

    def embedding(self, rows: int, dim: int) -> nn.Module:
        return Int4Embedding(rows, dim)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        eye = torch.eye(module.in_features)  # the kernel applied to the identity gives W^T (float32: exact)
        return int4_linear(eye, module.weight_int4, module.weight_scale_zeros, module.group, None).float().t()

    def bench(self, shape: tuple[int, int], dtype: torch.dtype) -> LayerCall:
        layer = Int4Linear(shape[1], shape[0], bias=False)
        layer.to(dtype)
        layer._fill(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), 0)
        return lambda x, name: layer(x)

    def stored_tensors(
        self, out_features: int, in_features: int, dtype: torch.dtype
    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {
            "weight_packed": (torch.int32, (out_features, in_features // PER_INT32)),
            "weight_scale": (dtype, (out_features, in_features // GROUP)),
            "weight_shape": (torch.int64, (2,)),
        }

    def stored_rows(self, rows: torch.Tensor, leaf: str, dtype: torch.dtype) -> torch.Tensor:
        q, scale = quantize_int4(rows, dtype, GROUP)
        return pack_int4(q) if leaf == "weight_packed" else scale

    def stored_constants(self, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {"weight_shape": torch.tensor([out_features, in_features])}


FORMAT = Int4Format()
