"""The weight formats, by name: the one list every other place asks (base.py says what a format declares).

Adding a format is its module and one line in BUILTIN. `register` adds one at run time (a test's toy format, a
plug-in), `unregister` takes it away again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import OptionError
from . import dense, int4, int8
from .base import WeightFormat

BUILTIN: tuple[WeightFormat, ...] = (dense.FORMAT, int8.FORMAT, int4.FORMAT)
_FORMATS: dict[str, WeightFormat] = {f.name: f for f in BUILTIN}


def register(fmt: WeightFormat) -> WeightFormat:
    if fmt.name in _FORMATS:
        raise ValueError(f"a weight format named {fmt.name!r} is registered already")
    if fmt.fallback is not None and fmt.fallback not in _FORMATS:
        raise ValueError(f"{fmt.name}: its fallback format {fmt.fallback!r} is not registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    if any(f.name == name for f in BUILTIN):
        raise ValueError(f"{name!r} is a built-in format")
    _FORMATS.pop(name, None)


@contextmanager
def registered(fmt: WeightFormat) -> Iterator[WeightFormat]:
    """`fmt` registered for the length of a block."""
    register(fmt)
    try:
        yield fmt
    finally:
        unregister(fmt.name)


def names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def quantize_modes() -> tuple[str, ...]:
    """The formats `--quantize` offers, in registration order."""
    return tuple(name for name, f in _FORMATS.items() if f.quantizes)


def get(name: str) -> WeightFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise OptionError(f"weight format {name!r} is not one of {', '.join(_FORMATS)}") from None


def of(module: nn.Module) -> WeightFormat | None:
    """The format of a layer (its class's FORMAT), or None for a module that is not a weight layer."""
    name = getattr(module, "FORMAT", None)
    return _FORMATS.get(name) if name is not None else None


def fallback_chain(name: str) -> list[str]:
    """`name` and the formats its layers fall back to, in order (int4 -> int8)."""
    chain = [name]
    while (nxt := get(chain[-1]).fallback) is not None and nxt not in chain:
        chain.append(nxt)
    return chain


def dequantize(module: nn.Module) -> torch.Tensor:
    """The float32 (O, I) weight a layer of any format computes with (tests and quality checks)."""
    fmt = of(module)
    if fmt is None:
        raise TypeError(f"{type(module).__name__} is not a weight layer")
    return fmt.dequantize(module)
