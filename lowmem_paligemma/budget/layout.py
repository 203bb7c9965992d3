"""Where one streamed layer's tensors sit in its buffer, and how each is read: the layout the residency plan
sizes buffers by (residency.py) and the streamer reads into (streamer.py).

Tensors stored as computed keep the file's layout: each run of them lying together in one shard is a span whose
aligned blocks are read with O_DIRECT straight into the buffer. The others (converted to another dtype, or
quantized as read) get aligned places of their own, filled through the readers' staging buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.loader import LoadPlan, RowFill
from ..checkpoint.pagecache import DIRECT_ALIGN, align_down, align_up
from ..checkpoint.safetensors_io import TensorEntry


@dataclass(frozen=True)
class Place:
    name: str  # full parameter name
    start: int  # byte offset of its first byte in a buffer
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * torch.Size(self.shape).numel()


@dataclass(frozen=True)
class Span:
    """File bytes [first, end) (aligned) of one shard, holding tensors up to `data_end`, read to buffer offset `at`."""

    path: Path
    first: int
    end: int
    data_end: int
    at: int


@dataclass(frozen=True)
class Layout:
    """Where one layer's parameters sit in a buffer, and how each is read."""

    places: tuple[Place, ...]
    spans: tuple[Span, ...]  # read as stored, straight into the buffer
    copies: tuple[tuple[TensorEntry, str], ...]  # converted to the parameter's dtype through the staging buffer
    fills: tuple[tuple[TensorEntry, RowFill], ...]  # quantized as read, through the staging buffer
    nbytes: int  # the buffer it needs
    stored: int  # checkpoint bytes read


def layer_layout(params: dict[str, torch.Tensor], part: LoadPlan) -> Layout:
    """One layer's buffer layout (`params` on meta in their final dtype, `part` the checkpoint's tensors for
    them). Tensors stored as computed keep the file's layout: each run of them lying together in one shard is a
    span whose aligned blocks are read with O_DIRECT straight into the buffer, the spare bytes before and after
    inside the span's own region. The others get aligned places of their own, filled through staging."""
    pos, places, spans, copies = 0, [], [], []
    run: list[tuple[TensorEntry, str]] = []

    def close_run() -> None:
        nonlocal pos
        if run:
            first, data_end = align_down(run[0][0].offset), run[-1][0].offset + run[-1][0].nbytes
            end = align_up(data_end)
            spans.append(Span(run[0][0].path, first, end, data_end, pos))
            places.extend(Place(n, pos + e.offset - first, params[n].dtype, tuple(params[n].shape)) for e, n in run)
            pos += end - first
            run.clear()

    for name, entry in sorted(part.copies.items(), key=lambda kv: (str(kv[1].path), kv[1].offset)):
        p = params[name]
        if entry.dtype != p.dtype or entry.offset % p.element_size():  # a view needs its dtype's alignment
            copies.append((entry, name))
            continue
        if run:
            last = run[-1][0]
            if entry.path != last.path or entry.offset > last.offset + last.nbytes + DIRECT_ALIGN:
                close_run()
        run.append((entry, name))
    close_run()
    staged = [name for _, name in copies] + [full for name in part.fills for full in part.filled(name)]
    for name in staged:
        places.append(Place(name, pos, params[name].dtype, tuple(params[name].shape)))
        pos += align_up(places[-1].nbytes)
    stored = sum(e.nbytes for e in part.copies.values()) + sum(e.nbytes for e, _ in part.fills.values())
    return Layout(tuple(places), tuple(spans), tuple(copies), tuple(part.fills.values()), pos, stored)
