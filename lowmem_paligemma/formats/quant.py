"""Weight-only quantization: int8 per output row, int4 in groups, computed row by row while the checkpoint streams.

Formats (one home; ops.py computes with them, docs/quantization.md explains the choices):
- int8: symmetric, one scale per output row, scale = max|w| / 127, q = round(w / scale) in [-127, 127]
  (the layout of torch's `_weight_int8pack_mm` and gpt-fast). Held as `weight` int8 (O, I) and
  `weight_scale` (O, 1): compressed-tensors' names and shapes, so a pre-quantized checkpoint is copied as stored.
- int4: symmetric in groups of INT4_GROUP along the input, scale = max|w| / 7.5, q = round(w / scale) clamped
  to [-8, 7] (compressed-tensors' symmetric rule), held in torch's CPU int4 layout for
  `_weight_int4pack_mm_for_cpu`: `weight_int4` (O, I/2) uint8 and `weight_scale_zeros` (I/g, O, 2) with
  zero 0, so w = (q + 8 - 8) * scale. That layout depends on the CPU's vector width, so it is built at load
  time, 64 rows at a time (its block), and never written to a file: a pre-quantized checkpoint stores
  compressed-tensors' `weight_packed` (compressed.py), unpacked and repacked into it while streaming.
Every scale is rounded *up* to a value of the model dtype before q is computed: the scale the kernels use is
the one the weights were quantized against (an all-zero row gets scale 1).

What is quantized (`quantize_model`, on the meta model, before anything is allocated):
- int8: every decoder and vision-tower linear layer, and the tied embedding (rows dequantized for the
  lookup; the logits product through the int8 kernel). The projector, norms, patch convolution and the
  position table stay dense (small).
- int4: the same layers and the embedding wherever the int4 kernel's shape rules hold (out features a
  multiple of 16, in features of the group size), int8 elsewhere: in PaliGemma only SigLIP's second MLP
  layer, whose 4304-wide input is not a multiple of any group size the kernel takes (32..256). The
  embedding's lookup reads rows out of the kernel's layout (`int4_rows`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..checkpoint.loader import RowFill
from ..checkpoint.safetensors_io import DTYPE_BY_NAME
from ..errors import CheckpointError, OptionError
from .compressed import INT4_PER_INT32, unpack_int4
from .ops import REFERENCE, Embedding, KernelChoice, Linear, Scratch, int4_linear, int8_linear

QUANT_MODES = ("int8", "int4")
INT4_GROUP = 128  # compressed-tensors' and gpt-fast's default; every PaliGemma decoder width is a multiple
INT4_BLOCK_ROWS = 64  # torch's CPU int4 layout packs blocks of 64 rows: fills must start on a block
FLOAT_DTYPES = tuple(d for d in DTYPE_BY_NAME.values() if d.is_floating_point)  # what a quantizing fill takes


# --- the arithmetic ------------------------------------------------------------------------------------------


def _exact_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scales -> the nearest values of `dtype` at or above them (0 -> 1), as float32."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rounded = scale.to(dtype)
    low = rounded.float() < scale
    if low.any():  # one step up: positive floats order like their bit patterns
        bits = {2: torch.int16, 4: torch.int32}[rounded.element_size()]
        rounded = torch.where(low, (rounded.view(bits) + 1).view(dtype), rounded)
    return rounded.float()


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, I) -> q (n, I) int8, scale (n,) in `dtype`."""
    w = w.float()
    scale = _exact_scale(w.abs().amax(1) / 127, dtype)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(dtype)


def quantize_int4(w: torch.Tensor, dtype: torch.dtype, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, I) -> q (n, I) int32 in [-8, 7], scale (n, I / group) in `dtype`."""
    n, i = w.shape
    g = w.float().view(n, i // group, group)
    scale = _exact_scale(g.abs().amax(2) / 7.5, dtype)
    q = torch.round(g / scale[..., None]).clamp_(-8, 7).to(torch.int32)
    return q.view(n, i), scale.to(dtype)


def int4_kernel_ok(out_features: int, in_features: int, group: int = INT4_GROUP) -> bool:
    """Shapes `_weight_int4pack_mm_for_cpu` takes (it crashes or raises on others)."""
    return out_features % 16 == 0 and in_features % group == 0 and group in (32, 64, 128, 256)


# --- the layers ----------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    FORMAT = "int8"
    kernels: KernelChoice = REFERENCE["int8"]

    def __init__(self, in_features: int, out_features: int, bias: bool, scratch: Scratch | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.scratch = scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias, self.kernels, self.scratch)

    def row_fills(self) -> dict[str, RowFill]:
        """A stored float `weight` is quantized as it streams (a stored int8 one is copied as is)."""
        shape = (self.out_features, self.in_features)
        return {"weight": RowFill(shape, self._fill, ("weight", "weight_scale"), dtypes=FLOAT_DTYPES)}

    def _fill(self, rows: torch.Tensor, start: int) -> None:
        q, scale = quantize_int8(rows, self.weight_scale.dtype)
        self.weight[start : start + len(q)] = q
        self.weight_scale[start : start + len(q), 0] = scale


class Int8Embedding(Int8Linear):
    """The tied embedding in int8: `lookup` dequantizes the gathered rows, `logits` reads the table in int8."""

    def __init__(self, rows: int, dim: int):
        super().__init__(dim, rows, bias=False)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale[ids]  # one per gathered row: (*ids.shape, 1)
        return self.weight[ids].to(scale.dtype) * scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # Never the scratch buffer: a dequantized table would be a 16-bit copy of the largest tensor.
        return int8_linear(x, self.weight, self.weight_scale, None, KernelChoice("int8pack", "int8pack"))


class Int4Linear(nn.Module):
    FORMAT = "int4"
    kernels: KernelChoice = REFERENCE["int4"]

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = INT4_GROUP):
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
        o, i, block, packed = self.out_features, self.in_features, INT4_BLOCK_ROWS, ("weight_int4",)
        return {
            "weight": RowFill((o, i), self._fill, ("weight_int4", "weight_scale_zeros"), block, FLOAT_DTYPES),
            "weight_packed": RowFill((o, i // INT4_PER_INT32), self._fill_packed, packed, block, (torch.int32,)),
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


@functools.cache
def _int4_nibble_order(rows: int, cols: int) -> torch.Tensor:
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
    block, row = ids // INT4_BLOCK_ROWS, ids % INT4_BLOCK_ROWS
    out = torch.empty(len(ids), cols, dtype=scale_zeros.dtype, device=packed.device)
    for size in {min(INT4_BLOCK_ROWS, n - int(b) * INT4_BLOCK_ROWS) for b in block.unique()}:
        pick = (torch.minimum(n - block * INT4_BLOCK_ROWS, torch.tensor(INT4_BLOCK_ROWS)) == size).nonzero()[:, 0]
        where = _int4_nibble_order(size, cols).view(size, cols)[row[pick]]  # (k, I) nibble indices in the block
        where = where + (block[pick] * INT4_BLOCK_ROWS * cols)[:, None]  # ... in the tensor
        q = (flat[where // 2] >> ((where % 2) * 4).to(torch.uint8)) & 15
        scale = scale_zeros[:, ids[pick], 0].t().repeat_interleave(group, 1)  # (k, I)
        out[pick] = ((q.float() - 8) * scale.float()).to(out.dtype)  # exact product, rounded once
    return out.view(*shape, cols)


class Int4Embedding(Int4Linear):
    """The tied embedding in int4: `lookup` gathers and dequantizes rows out of the kernel's layout, `logits`
    reads the table through the int4 kernel."""

    def __init__(self, rows: int, dim: int):
        super().__init__(dim, rows, bias=False)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return int4_rows(self.weight_int4, self.weight_scale_zeros, self.group, ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The float32 weight a quantized layer computes with (for tests and quality checks)."""
    if isinstance(module, Int8Linear):
        return module.weight.float() * module.weight_scale.float()
    if isinstance(module, Int4Linear):  # the kernel applied to the identity gives W^T (float32: exact)
        eye = torch.eye(module.in_features)
        return int4_linear(eye, module.weight_int4, module.weight_scale_zeros, module.group, None).float().t()
    raise TypeError(f"{type(module).__name__} is not a quantized layer")


# --- the policy ----------------------------------------------------------------------------------------------


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Swap `model`'s layers for quantized ones in place, on meta (see the module docstring for which)."""
    if mode not in QUANT_MODES:
        raise OptionError(f"quantize must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    scratch = Scratch()  # one dequantization buffer for the whole model
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        with torch.device("meta"):
            if isinstance(module, Embedding) and name.endswith("embed_tokens"):
                rows, dim = module.weight.shape
                int4 = mode == "int4" and int4_kernel_ok(rows, dim)
                setattr(parent, child, Int4Embedding(rows, dim) if int4 else Int8Embedding(rows, dim))
            elif isinstance(module, Linear) and (".layers." in name):  # decoder and vision-tower blocks
                o, i, bias = module.out_features, module.in_features, module.bias is not None
                if mode == "int4" and int4_kernel_ok(o, i):
                    setattr(parent, child, Int4Linear(i, o, bias))
                else:
                    setattr(parent, child, Int8Linear(i, o, bias, scratch))
    return model
