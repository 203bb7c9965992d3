"""The load pre-flight: what a module's parameters will take once loaded, and refusing a load that will not fit.

Generic, like the loader that calls it: it reads sizes off any module built on meta (a quantized layer's
parameters at their own size, float ones at the load dtype). What a *request* needs beside the weights (KV
cache, activations) is PaliGemma's business: budget/memory.py computes it and callers pass it as `reserve`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from ..errors import InsufficientMemoryError
from ..units import format_bytes

RUNTIME_MARGIN_BYTES = 300 << 20  # interpreter, torch, tokenizer and the read chunks, roughly


def param_bytes(p: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes one parameter takes once loaded in `dtype` (float ones; others keep theirs). Works on meta."""
    return p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())


def model_bytes(model: nn.Module, dtype: torch.dtype, exclude: Collection[str] = ()) -> int:
    """Bytes `model`'s parameters (but those named in `exclude`) take once loaded in `dtype`. Works on meta."""
    return sum(param_bytes(p, dtype) for name, p in model.named_parameters() if name not in exclude)


def available_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def memory_needed(model: nn.Module, dtype: torch.dtype, chunk_bytes: int, exclude: Collection[str] = ()) -> int:
    """Bytes a load of `model` (on meta) needs: its parameters as loaded (quantized ones at their size; those
    in `exclude` not at all), the read chunks and the runtime margin. The pre-flight's sum, in one place."""
    return model_bytes(model, dtype, exclude) + chunk_bytes + RUNTIME_MARGIN_BYTES


def check_memory(
    need: int, device: torch.device | str, advice: str = "", reserve: Mapping[str, int] | None = None
) -> None:
    """Refuse, before anything large is allocated, a load that needs `need` bytes (weights, chunks, margin) and
    `reserve` (what the caller needs beside the weights, by part: a request's KV cache and activations)
    when less memory is available now; the message says what takes the room."""
    reserve = reserve or {}
    weights, need = need, need + sum(reserve.values())
    have = available_bytes(device)
    if need > have:
        where = torch.device(device).type
        parts = "".join(f", {name} {format_bytes(n)}" for name, n in reserve.items())
        breakdown = f" (weights {format_bytes(weights)}{parts})" if reserve else ""
        advice += ", ask for a shorter request" if reserve else ""
        raise InsufficientMemoryError(
            f"loading needs about {format_bytes(need)} of {where} memory{breakdown} but {format_bytes(have)} is "
            f"available; close other programs{advice}, or skip this check (--force / preflight=False)"
        )
