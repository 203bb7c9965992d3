"""The int4 format: symmetric groups of GROUP along the input, held in compressed-tensors' own layout.

scale = max|w| / 7.5 rounded *up* to the model dtype, q = round(w / scale) clamped to [-8, 7] (compressed-tensors'
symmetric rule). Held as `weight_packed` (O, I/2) uint8 and `weight_scale` (O, I/g) in the model dtype: byte j of a
row holds value 2j in its low nibble and 2j + 1 in its high one, each stored as q + 8. These are the bytes of
compressed-tensors' "pack-quantized" `weight_packed` (O, I/8) int32 on a little-endian host (value j is the nibble
at bits 4 * (j % 8) of word j // 8), so a pre-quantized checkpoint is read as stored, and the layout is the same on
every machine. w = (q + 8 - 8) * scale.

Kernels (the chooser times them on the running machine):
- "dequant": the layer dequantized into a reused buffer of the model dtype (base.Scratch), then F.linear; the
  reference, any device;
- "upcast": dequantized into a float32 buffer, then a float32 GEMM (for CPUs whose 16-bit GEMM is slow); exact
  products, as every other kernel here;
- "native": our decode kernel (native.cpp): nibbles looked up in a per-group table of (q - 8) * scale and
  multiplied into fp32 sums, the weights read once (decode only);
- "vnni": our integer kernels (CPUs with AVX512-VNNI, groups of a multiple of 128), a decode (native_dot.cpp)
  and a prefill (native_vnni_gemm.cpp): the activations quantized to int8 in blocks of inputs (scale = max|x| /
  127, q = round-half-even(x / scale); VNNI_BLOCK = 32 inputs in a decode step, llama.cpp's Q8_0 and OpenVINO's
  dynamic activation groups; VNNI_PREFILL_BLOCK = 128 in a prefill, one weight group, so that each group's int32
  sum is scaled once), multiplied with the stored nibbles in exact int32 sums, each block's sum scaled in fp32.
  Its rounding is the weights' and the activations' (at most half a step of 1/127 of each block's largest value):
  the kernels here that are not exact in their products, offered, as int8's "int_mm" prefill is, because widening
  every weight to fp32 bounds a decode step in int4, and a prefill runs twice as many integer products a second
  as bf16 ones on CPUs with VNNI.
- "amx": the "vnni" prefill on AMX tiles (native_amx_gemm.cpp, CPUs with AMX-INT8 where Linux grants the tiles):
  the same activations and int32 sums, so the same bits, 16,384 byte products an instruction;
- "maddubs": those integer kernels on CPUs with AVX2 and no AVX-512, the decode in native_dot.cpp and the prefill
  in native_dot_gemm.cpp: vpmaddubsw + vpmaddwd give the int32 sums vpdpbusd gives, so the same rounding (the
  prefill: gemm_int4_vnni's bits). On such a CPU the prefill runs ~3x the "upcast" prefill's float32 GEMM
  (docs/results/kernels.md).

The shape rules (`accepts`): out features a multiple of 16 and in features of the group size hold for every
PaliGemma layer but SigLIP's second MLP layer (4304-wide input): it falls back to int8. The tied embedding's
lookup dequantizes the gathered rows; its logits take the chosen decode kernel, or a dequantization a few thousand
rows at a time (never a 16-bit copy of the table).

Axes: M rows (batch x tokens), I in features, O out features, G groups per row (I / GROUP).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.loader import FILL_BYTES_PER_ELEMENT, RowFill
from ..checkpoint.safetensors_io import FLOAT_DTYPES
from ..errors import CheckpointError
from . import native
from .base import DECODE_ROWS, CompressedScheme, KernelChoice, LayerCall, Scratch, WeightFormat, round_scale_up

GROUP = 128  # compressed-tensors' and gpt-fast's default; every PaliGemma decoder width is a multiple
VNNI_BLOCK = 32  # inputs sharing one activation scale in the "vnni" / "maddubs" decode (native_dot.cpp kBlock)
VNNI_CHUNK = 128  # its groups are whole multiples of this (a pair of vpdpbusd: 64 weight bytes)
VNNI_PREFILL_BLOCK = 128  # inputs sharing one activation scale in its prefill (native_vnni_gemm.cpp kChunk)
PER_INT32 = 8  # values in one compressed-tensors int32 word
DOT_KERNELS = ("vnni", "maddubs")  # the integer decode, by the byte dot product it runs on (native.int8_dot())


def quantize_int4(w: torch.Tensor, dtype: torch.dtype, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, I) -> q (n, I) int32 in [-8, 7], scale (n, I / group) in `dtype`."""
    n, i = w.shape
    g = w.float().view(n, i // group, group)
    scale = round_scale_up(g.abs().amax(2) / 7.5, dtype)
    q = torch.round(g / scale[..., None]).clamp_(-8, 7).to(torch.int32)
    return q.view(n, i), scale.to(dtype)


def quantize_int4_packed(
    w: torch.Tensor, dtype: torch.dtype, group: int = GROUP, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, I) -> the layer's bytes (n, I/2) uint8 and scale (n, I / group) in `dtype`: `quantize_int4` then
    `pack_int4`, in one native.cpp loop where it built (the same bytes, at ten times the rate). `out`: an (n, I/2)
    uint8 tensor the bytes are written to (and returned): a loading layer's own rows, no copy."""
    nk = native.kernels()
    if nk is not None and w.device.type == "cpu" and w.dim() == 2 and group % 32 == 0:
        direct = out is not None and out.is_contiguous() and out.device.type == "cpu"
        packed, scale = nk.quantize_int4(w.contiguous(), dtype, group, out if direct else None)
        if out is not None and not direct:
            packed = out.copy_(packed)
        return packed, scale.to(dtype)
    q, scale = quantize_int4(w, dtype, group)
    packed = pack_int4(q).view(torch.uint8)
    return (packed if out is None else out.copy_(packed)), scale


def int4_kernel_ok(out_features: int, in_features: int, group: int = GROUP) -> bool:
    """The shapes the int4 layers take: whole groups per row, groups the native kernels step through (32 values
    at a time), rows in multiples of 16 (the layout torch's and compressed-tensors' int4 kernels want too)."""
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


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group: int, out: torch.Tensor) -> torch.Tensor:
    """out (n, I) = the rows of `packed` (n, I/2) uint8 times their group scales (n, I/g), rounded once to out's
    dtype (native.cpp's vector loop where it built, else the same arithmetic in torch ops)."""
    nk = native.kernels()
    if nk is not None and out.device.type == "cpu" and group % 32 == 0:
        nk.dequantize_int4(packed, scale, group, out)
        return out
    q = torch.stack([packed & 15, packed >> 4], -1).view(len(packed), -1).float() - 8  # (n, I): even, odd, ...
    return out.copy_(q.mul_(scale.float().repeat_interleave(group, 1)))


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    group: int,
    bias: torch.Tensor | None,
    kernels: KernelChoice,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """x (..., I) @ W^T + bias with W = packed (O, I/2) uint8 nibbles x scale (O, I/g) -> (..., O) in x's dtype."""
    rows, o = x.shape[:-1].numel(), packed.shape[0]
    x2 = x.reshape(rows, x.shape[-1])
    name = kernels.pick(rows)
    nk = native.kernels() if x.device.type == "cpu" else None
    decode = rows <= DECODE_ROWS and nk is not None
    dot = name in DOT_KERNELS and nk is not None and group % VNNI_CHUNK == 0 and nk.int8_dot() == name
    vnni = name == "vnni" and nk is not None and group % VNNI_CHUNK == 0 and nk.has_vnni()
    amx = name == "amx" and not decode and nk is not None and group % VNNI_CHUNK == 0 and nk.has_amx()
    gemm_dot = not decode and dot and name == "maddubs"
    if decode and dot:
        y = nk.gemv_int4_dot(x2, packed, scale, group)
    elif decode and name in ("native", *DOT_KERNELS):
        y = nk.gemv_int4(x2, packed, scale, group)
    elif vnni:
        y = nk.gemm_int4_vnni(x2, packed, scale, group)
    elif amx:
        y = nk.gemm_int4_amx(x2, packed, scale, group)
    elif gemm_dot:
        y = nk.gemm_int4_dot(x2, packed, scale, group)
    else:
        wide = name == "upcast" and x.device.type == "cpu"
        dtype = torch.float32 if wide else x.dtype
        w = dequantize_int4(packed, scale, group, (scratch or Scratch()).get((o, x.shape[-1]), dtype, x.device))
        y = F.linear(x2.to(dtype), w).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], o)


class Int4Linear(nn.Module):
    FORMAT = "int4"
    kernels: KernelChoice = KernelChoice("dequant", "dequant")
    scratch: Scratch | None = None  # the model's shared buffers (formats.kernels.use_kernels)

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = GROUP):
        super().__init__()
        if not int4_kernel_ok(out_features, in_features, group):
            raise ValueError(f"int4 needs out % 16 == 0 and in % {group} == 0, got {out_features} x {in_features}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.weight_packed = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(out_features, in_features // group), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.weight_packed, self.weight_scale, self.group, self.bias, self.kernels, self.scratch)

    def row_fills(self) -> dict[str, RowFill]:
        """A stored float `weight` is quantized as it streams; a pre-quantized layer's `weight_packed` (O, I/8)
        int32 words are copied as their bytes, `weight_scale` is a plain copy, `weight_shape` is checked."""
        o, i = self.out_features, self.in_features
        # native.cpp's loop writes the packed bytes into the layer (a float32 row at a time)
        extra = 0 if native.kernels() is not None and self.group % 32 == 0 else FILL_BYTES_PER_ELEMENT
        return {
            "weight": RowFill((o, i), self._fill, ("weight_packed", "weight_scale"), 1, FLOAT_DTYPES, extra),
            "weight_packed": RowFill((o, i // PER_INT32), self._fill_packed, ("weight_packed",), 1, (torch.int32,)),
            "weight_shape": RowFill((2,), self._check_shape, (), 2, (torch.int64,)),
        }

    def _fill(self, rows: torch.Tensor, start: int) -> None:
        rows_out = self.weight_packed.data[start : start + len(rows)]
        _, scale = quantize_int4_packed(rows, self.weight_scale.dtype, self.group, out=rows_out)
        self.weight_scale[start : start + len(rows)] = scale

    def _fill_packed(self, packed: torch.Tensor, start: int) -> None:
        if sys.byteorder != "little":  # the nibble order is the bytes of little-endian words
            raise NotImplementedError("int4 layouts assume a little-endian host")
        self.weight_packed[start : start + len(packed)] = packed.contiguous().view(torch.uint8)

    def _check_shape(self, shape: torch.Tensor, start: int) -> None:
        want = [self.out_features, self.in_features]
        if shape.tolist() != want:
            raise CheckpointError(f"a stored weight_shape holds {shape.tolist()}, its int4 layer is {want}")


class Int4Embedding(Int4Linear):
    """The tied embedding in int4: `lookup` dequantizes the gathered rows, `logits` takes the chosen decode kernel
    (a prefill's last position is one row too), or dequantizes LOGIT_ROWS rows of the table at a time."""

    LOGIT_ROWS = 4096  # 32 MB of float32 for a 2048-wide table

    def __init__(self, rows: int, dim: int):
        super().__init__(dim, rows, bias=False)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = torch.empty(len(flat), self.in_features, dtype=self.weight_scale.dtype, device=ids.device)
        dequantize_int4(self.weight_packed[flat], self.weight_scale[flat], self.group, out)
        return out.view(*ids.shape, self.in_features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if self.kernels.decode in ("native", *DOT_KERNELS) and rows <= DECODE_ROWS:
            return int4_linear(x, self.weight_packed, self.weight_scale, self.group, None, self.kernels)
        parts, xf = [], x.float()
        for r0 in range(0, self.out_features, self.LOGIT_ROWS):  # float32 rows: each w = q * scale exactly
            r1 = min(self.out_features, r0 + self.LOGIT_ROWS)
            w = dequantize_int4(self.weight_packed[r0:r1], self.weight_scale[r0:r1], self.group,
                                torch.empty(r1 - r0, self.in_features, device=x.device))  # fmt: skip
            parts.append(F.linear(xf, w))
        return torch.cat(parts, -1).to(x.dtype)


class Int4Format(WeightFormat):
    name = "int4"
    decode_kernels = ("dequant", "native", "vnni", "maddubs")
    prefill_kernels = ("dequant", "upcast", "vnni", "amx", "maddubs")
    reference = KernelChoice("dequant", "dequant")
    fallback = "int8"
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
        out = torch.empty(module.out_features, module.in_features)
        return dequantize_int4(module.weight_packed, module.weight_scale, module.group, out)

    def available_kernels(self, dtype: torch.dtype) -> tuple[str, ...]:
        names = set(super().available_kernels(dtype))
        nk = native.kernels()
        if nk is None:
            names.discard("native")
        if nk is None or not nk.has_vnni() or GROUP % VNNI_CHUNK:
            names.discard("vnni")
        if nk is None or not nk.has_amx() or GROUP % VNNI_CHUNK:
            names.discard("amx")
        if nk is None or nk.int8_dot() != "maddubs" or GROUP % VNNI_CHUNK:
            names.discard("maddubs")
        if dtype == torch.float32:
            names.discard("upcast")  # "dequant" is it
        return tuple(sorted(names))

    def bench(self, shape: tuple[int, int], dtype: torch.dtype) -> LayerCall:
        layer = Int4Linear(shape[1], shape[0], bias=False)
        layer.to(dtype)
        layer._fill(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), 0)
        scratch = Scratch()
        return lambda x, name: int4_linear(x, layer.weight_packed, layer.weight_scale, layer.group, None,
                                           KernelChoice(name, name), scratch)  # fmt: skip

    def scratch_bytes(self, modules: list[nn.Module], choice: KernelChoice, dtype: torch.dtype) -> int:
        """The largest int4 linear layer dequantized: in the model dtype ("dequant"), in float32 ("upcast")."""
        largest = max((m.out_features * m.in_features for m in modules if not hasattr(m, "lookup")), default=0)
        sizes = {"dequant": dtype.itemsize, "upcast": 4}
        return sum(largest * sizes[k] for k in {choice.decode, choice.prefill} if k in sizes)

    def stored_tensors(
        self, out_features: int, in_features: int, dtype: torch.dtype
    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {
            "weight_packed": (torch.int32, (out_features, in_features // PER_INT32)),
            "weight_scale": (dtype, (out_features, in_features // GROUP)),
            "weight_shape": (torch.int64, (2,)),
        }

    def stored_rows(self, rows: torch.Tensor, leaf: str, dtype: torch.dtype) -> torch.Tensor:
        packed, scale = quantize_int4_packed(rows, dtype, GROUP)
        return packed.view(torch.int32) if leaf == "weight_packed" else scale

    def stored_constants(self, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {"weight_shape": torch.tensor([out_features, in_features])}


FORMAT = Int4Format()
