"""The one CPU-aware primitive: a linear layer that picks its kernel from what was measured on CPU.

- One token (decode): `torch.mv` streams a 16-bit weight ~1.6x faster than `F.linear` does for a single
  row (43 vs 27 GB/s for bf16 with 2 threads). Decoding is bandwidth-bound, so this is the decode speed.
- float16 weights, several tokens (prefill): CPU float16 GEMMs have no fast path without AMX-FP16 (the
  reference's float16 prefill is 8x slower than its bfloat16 one), so the product runs in bfloat16 on a
  CPU with bfloat16 support and in float32 otherwise, one weight cast at a time (bounded temporary).
Numbers and the command that measured them: docs/speed.md (bench/generate_speed.py).
Elsewhere (GPU, bf16/fp32 prefill) it is plain `F.linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def cpu_gemm_dtype() -> torch.dtype:
    """The dtype float16 products are computed in on this CPU."""
    return (
        torch.bfloat16
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else torch.float32
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the CPU kernel choices above. x (..., I), weight (O, I) -> (..., O)."""
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if x.shape[:-1].numel() == 1:
        y = torch.mv(weight, x.reshape(-1))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    if weight.dtype == torch.float16:
        dtype = cpu_gemm_dtype()
        b = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), weight.to(dtype), b).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
