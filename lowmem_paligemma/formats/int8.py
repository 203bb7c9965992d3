"""The int8 format: symmetric, one scale per output row, quantized row by row while the checkpoint streams.

scale = max|w| / 127 rounded *up* to the model dtype (base.round_scale_up), q = round(w / scale) in [-127, 127]
(the layout of torch's `_weight_int8pack_mm` and gpt-fast). Held as `weight` int8 (O, I) and `weight_scale`
(O, 1): compressed-tensors' names and shapes ("naive-quantized", channel strategy), so a pre-quantized
checkpoint is copied as stored and a `convert --quantize int8` one is what transformers loads.

Kernels (the chooser times them on the running machine):
- "int8pack": torch's `_weight_int8pack_mm`, weight-only (16-bit activations);
- "dequant": into one reused 16-bit buffer (base.Scratch), then F.linear; the reference;
- "upcast": into a reused float32 buffer (each q * scale exact in float32), then a float32 GEMM, prefill only: for
  CPUs without fast 16-bit or int8 GEMMs (AVX2 only: oneDNN's bf16 GEMM ran at 0.16x and `_int_mm` at 0.05x its
  float32 rate there, docs/results/kernels.md), as dense's and int4's "upcast";
- "int_mm": activations quantized per row on the fly, int8 x int8 -> int32 `torch._int_mm` (VNNI / AMX-INT8
  where the CPU has them), prefill only;
- "native": our own decode kernel (native.cpp): the int8 weight widened in registers, fp32 sums, the row's scale
  applied to its sum (exact products, as "int8pack");
- "maddubs": our integer decode on CPUs with AVX2 and no AVX-512 (native_dot.cpp): the activations quantized to
  int8 in blocks of 32 inputs (int4's VNNI_BLOCK, the same rule), exact int32 sums per block (vpmaddubsw on |w| and
  x_q with w's sign), each block's sum scaled in fp32, the row's sum by the row's scale. Its rounding is the
  activations' (at most half a step of 1/127 of each block's largest value), as int4's integer decode: widening
  every byte to fp32 kept "native" at ~0.7 of the memory rate on such a CPU (docs/results/kernels.md);
  "vnni" as a decode is the same on AVX512-VNNI (vpdpbusd, x_q negated where w is negative), the same rounding;
- "vnni": "int_mm"'s product in our own GEMM (native_vnni_gemm.cpp, CPUs with AVX512-VNNI, prefill only): the same
  activation rows, the same exact int32 sums and rescale, so the same bits; each weight read once per pass over
  the activations, where oneDNN's int8 GEMM ran at half its single-layer rate inside a whole model;
- "amx": that GEMM on AMX tiles (native_amx_gemm.cpp, CPUs with AMX-INT8 where Linux grants the tiles, prefill
  only): the same int32 sums, so "int_mm"'s bits again, 16,384 byte products an instruction.
  "maddubs" as a prefill is that GEMM on AVX2 (native_dot_gemm.cpp: weights and activations widened to int16,
  vpmaddwd): `int_mm`'s bits again, ~2x the "upcast" prefill's float32 GEMM there and no float32 copy of a layer.
The private torch kernels crash (not raise) on shapes they do not support, so each is used only where its
shape rules hold (`int8pack_ok`) and "dequant" otherwise. The tied embedding in int8 gathers and dequantizes
rows for the lookup and computes the logits with the chosen decode kernel, or "int8pack" (never the scratch
buffer: a dequantized table would be a 16-bit copy of the largest tensor).

Axes: M rows (batch x tokens), I in features, O out features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.loader import FILL_BYTES_PER_ELEMENT, RowFill
from ..checkpoint.safetensors_io import FLOAT_DTYPES
from . import native
from .base import DECODE_ROWS, CompressedScheme, KernelChoice, LayerCall, Scratch, WeightFormat, round_scale_up
from .int4 import DOT_KERNELS


def quantize_int8(
    w: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n, I) -> q (n, I) int8, scale (n,) in `dtype` (native.cpp's loop where it built: the same rule, to the bit,
    at ten times the rate, which is most of a quantizing load). `out`: an (n, I) int8 tensor q is written to (and
    returned): a loading layer's own rows, so that no (n, I) copy is made and copied again."""
    nk = native.kernels()
    if nk is not None and w.device.type == "cpu" and w.dim() == 2 and w.shape[1] % 16 == 0:
        direct = out is not None and out.is_contiguous() and out.device.type == "cpu"
        q, scale = nk.quantize_int8(w.contiguous(), dtype, out if direct else None)
        if out is not None and not direct:
            q = out.copy_(q)
        return q, scale.to(dtype)
    w = w.float()
    scale = round_scale_up(w.abs().amax(1) / 127, dtype)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return (q if out is None else out.copy_(q)), scale.to(dtype)


def quantize_temporaries(in_features: int) -> int:
    """Bytes per weight a quantizing fill holds beside its rows (loader.RowFill.temporaries): none where
    native.cpp's loop writes into the layer (a float32 row at a time), torch's temporaries otherwise."""
    return 0 if native.kernels() is not None and in_features % 16 == 0 else FILL_BYTES_PER_ELEMENT


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (M, I) -> q (M, I) int8, scale (M, 1) float32 for `int_mm`: scale = max(max|x_row|, 1e-12) / 127,
    q = round(x / scale) (native_vnni.cpp `quantize_rows_int8` computes the same bits)."""
    xf = x.float()
    x_scale = xf.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127  # (M, 1)
    return torch.round(xf / x_scale).to(torch.int8), x_scale


def int8pack_ok(x: torch.Tensor, q: torch.Tensor) -> bool:
    # _weight_int8pack_mm (CPU) was seen to segfault for in-features not a multiple of 16.
    return x.device.type == "cpu" and q.shape[1] % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (O, I) = q * scale[:, None], rounded to out's dtype (a 16-bit product keeps 8 or 11 bits; float32 holds
    it exactly: native.cpp's one streamed pass where it built, the same bits as torch's two)."""
    nk = native.kernels() if out.device.type == "cpu" and out.dtype == torch.float32 else None
    if nk is not None and q.is_contiguous() and out.is_contiguous():
        nk.dequantize_int8_float32(q, scale, out)
        return out
    out.copy_(q)
    return out.mul_(scale.to(out.dtype)[:, None])


def _has_vnni() -> bool:
    return (nk := native.kernels()) is not None and nk.has_vnni()


def _has_amx() -> bool:
    return (nk := native.kernels()) is not None and nk.has_amx()


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
    nk = native.kernels() if x.device.type == "cpu" else None
    if name in DOT_KERNELS and rows <= DECODE_ROWS and i % 32 == 0 and nk is not None and nk.int8_dot() == name:
        y = nk.gemv_int8_dot(x2, q, scale)
    elif name in ("native", *DOT_KERNELS) and rows <= DECODE_ROWS and nk is not None:
        y = nk.gemv_int8(x2, q, scale)
    elif name == "upcast" and x.device.type == "cpu" and rows > DECODE_ROWS:
        w = (scratch or Scratch()).get((o, i), torch.float32, x.device)
        y = F.linear(x2.float(), dequantize_int8(q, scale, w)).to(x.dtype)
    elif name == "int8pack" and int8pack_ok(x, q):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
    elif name == "vnni" and x.device.type == "cpu" and rows > DECODE_ROWS and o % 16 == 0 and _has_vnni():
        y = native.kernels().gemm_int8_vnni(x2, q, scale)  # quantize_rows_int8's rows, fused
    elif name == "amx" and x.device.type == "cpu" and rows > DECODE_ROWS and o % 16 == 0 and _has_amx():
        y = native.kernels().gemm_int8_amx(x2, q, scale)  # the same, on AMX tiles
    elif name == "maddubs" and rows > DECODE_ROWS and o % 16 == 0 and nk is not None and nk.int8_dot() == name:
        y = nk.gemm_int8_dot(x2, q, scale)  # the same, on AVX2
    elif name == "int_mm" and x.device.type == "cpu" and rows > DECODE_ROWS and i % 8 == 0:
        # Symmetric per-row activation scales; the int32 product is exact, the two scales are applied after.
        # native_vnni.cpp (AVX-512 builds) does each side in one pass (the same bits): torch's five passes each were
        # most of what an int8 prefill spent outside the GEMM.
        if _has_vnni():
            xq, x_scale = nk.quantize_rows_int8(x2)
            y = nk.rescale_int32(torch._int_mm(xq, q.t()), x_scale, scale, x.dtype)
        else:
            xq, x_scale = quantize_rows_int8(x2)
            y = torch._int_mm(xq, q.t()).float().mul_(x_scale).mul_(scale.float()).to(x.dtype)
    else:
        w = (scratch or Scratch()).get((o, i), x.dtype, x.device)
        y = F.linear(x2, dequantize_int8(q, scale, w))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], o)


class Int8Linear(nn.Module):
    FORMAT = "int8"
    kernels: KernelChoice = KernelChoice("dequant", "dequant")

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
        extra = quantize_temporaries(self.in_features)
        return {"weight": RowFill(shape, self._fill, ("weight", "weight_scale"), 1, FLOAT_DTYPES, extra)}

    def _fill(self, rows: torch.Tensor, start: int) -> None:
        _, scale = quantize_int8(rows, self.weight_scale.dtype, out=self.weight.data[start : start + len(rows)])
        self.weight_scale[start : start + len(rows), 0] = scale


class Int8Embedding(Int8Linear):
    """The tied embedding in int8: `lookup` dequantizes the gathered rows, `logits` reads the table in int8."""

    def __init__(self, rows: int, dim: int):
        super().__init__(dim, rows, bias=False)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale[ids]  # one per gathered row: (*ids.shape, 1)
        return self.weight[ids].to(scale.dtype) * scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # The format's chosen decode kernel (logits are wanted for the last position only: decode-sized), never the
        # dequantizing one: a dequantized table would be a 16-bit copy of the largest tensor.
        kernel = self.kernels.decode if self.kernels.decode != "dequant" else "int8pack"
        return int8_linear(x, self.weight, self.weight_scale, None, KernelChoice(kernel, "int8pack"))


class Int8Format(WeightFormat):
    name = "int8"
    decode_kernels = ("int8pack", "dequant", "native", "maddubs", "vnni")
    prefill_kernels = ("dequant", "int_mm", "int8pack", "vnni", "amx", "upcast", "maddubs")
    reference = KernelChoice("dequant", "dequant")
    compressed = CompressedScheme(
        "naive-quantized",
        {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel", "dynamic": False},
    )

    def linear(self, in_features: int, out_features: int, bias: bool, scratch: Scratch | None) -> nn.Module:
        return Int8Linear(in_features, out_features, bias, scratch)

    def embedding(self, rows: int, dim: int) -> nn.Module:
        return Int8Embedding(rows, dim)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.float() * module.weight_scale.float()

    def available_kernels(self, dtype: torch.dtype) -> tuple[str, ...]:
        names = set(super().available_kernels(dtype))
        if native.kernels() is None:
            names.discard("native")
        if native.kernels() is None or native.kernels().int8_dot() != "maddubs":
            names.discard("maddubs")
        if not _has_vnni():
            names.discard("vnni")
        if not _has_amx():
            names.discard("amx")
        if dtype == torch.float32:
            names.discard("upcast")  # "dequant" is it
        return tuple(sorted(names))

    def bench(self, shape: tuple[int, int], dtype: torch.dtype) -> LayerCall:
        q, scale = quantize_int8(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), dtype)
        scratch = Scratch()
        return lambda x, name: int8_linear(x, q, scale, None, KernelChoice(name, name), scratch)

    def scratch_bytes(self, modules: list[nn.Module], choice: KernelChoice, dtype: torch.dtype) -> int:
        """The largest int8 linear layer dequantized, when the chosen kernels dequantize (embeddings never): in the
        model dtype ("dequant"), in float32 ("upcast")."""
        largest = max((m.weight.numel() for m in modules if not hasattr(m, "lookup")), default=0)
        sizes = {"dequant": dtype.itemsize, "upcast": 4}
        return sum(largest * sizes[k] for k in {choice.decode, choice.prefill} if k in sizes)

    def stored_tensors(
        self, out_features: int, in_features: int, dtype: torch.dtype
    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"weight": (torch.int8, (out_features, in_features)), "weight_scale": (dtype, (out_features, 1))}

    def stored_rows(self, rows: torch.Tensor, leaf: str, dtype: torch.dtype) -> torch.Tensor:
        q, scale = quantize_int8(rows, dtype)
        return q if leaf == "weight" else scale[:, None]


FORMAT = Int8Format()
