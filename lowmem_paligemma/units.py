"""Byte sizes, one convention everywhere: decimal units (1 GB = 10**9 bytes), as the Hub's shard sizes
("5GB") and transformers' `max_shard_size` use. Binary units are accepted on input with an "i" (GiB)."""

from __future__ import annotations

import re

GB = 10**9

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '100KiB' -> 102_400, '4096' -> 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", text)
    unit = _UNITS.get(m[2].lower()) if m else None
    if m is None or unit is None:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MB, 100KB or a byte count")
    n = int(float(m[1]) * unit)
    if n <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return n


def format_size(n: int) -> str:
    """The shortest exact spelling, for option defaults: 5_000_000_000 -> '5GB', 1234 -> '1234B'."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def format_bytes(n: float | None) -> str:
    """A reading for people: '6.41 GB' from 0.1 GB up, then '512.3 MB', '88.0 KB', '512 B'; None -> '-'."""
    if n is None:
        return "-"
    if abs(n) >= GB / 10:
        return f"{n / GB:.2f} GB"
    if abs(n) >= 10**6:
        return f"{n / 10**6:.1f} MB"
    if abs(n) >= 10**3:
        return f"{n / 10**3:.1f} KB"
    return f"{int(n)} B"
