"""The one CPU-aware primitive: a linear layer that takes the kernel measured fastest on CPU.

Decoding feeds one token per step and streams every weight once, so it runs at memory bandwidth. For
a single row with bfloat16 weights `torch.mv` reads close to the DRAM limit and faster than `F.linear`;
with float16 weights it is the other way round, so float16 keeps `F.linear` (measured by
`bench/kernels.py`, numbers in docs/kernels.md). Prefill and GPU: plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the one-token bfloat16 fast path on CPU. x (..., I), weight (O, I) -> (..., O)."""
    if x.device.type == "cpu" and weight.dtype == torch.bfloat16 and x.shape[:-1].numel() == 1:
        y = torch.mv(weight, x.reshape(-1))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """A (rows, dim) table under the checkpoint's `.weight` key, created without nn.Embedding's random init:
    `normal_` on a meta tensor imports torch._dynamo, 0.9 s of every load (bench/load_memory.py found it)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
