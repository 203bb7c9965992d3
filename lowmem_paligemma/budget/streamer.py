"""Streamed layers: a fixed pool of layer buffers, filled by a background reader while the model computes.

How a streamed layer runs (residency.py decides which layers are streamed, docs/streaming.md the why):
- At load its parameters stay on meta (loader.stream_checkpoint's `exclude`): it costs no memory.
- The pool holds `plan.buffers` flat byte buffers (2: one computing, one being read), each big enough for any
  streamed layer; nothing else is allocated per pass.
- A reader thread walks the streamed layers in execution order, cyclically (after the last decoder layer
  comes the next forward's first), and reads the next one into a free buffer at the header offsets of the
  checkpoint's own shards, 4 reads in flight. A tensor stored as it is computed is read with O_DIRECT
  straight into its place in the buffer: no copy, and the page cache never holds it. Any other (a float32
  checkpoint computed in bfloat16, or weights quantized as they are read) goes through a small staging
  buffer and the loader's own conversion (`loader.apply_chunk`, the `RowFill` quantizers), exactly as at load.
  Where a filesystem refuses O_DIRECT, buffered reads drop their pages at once (pagecache.drop).
- A forward pre-hook on each streamed layer waits for its buffer (the layer's parameters are views of it);
  a forward post-hook, called even when the forward raises, points them back at meta and frees the buffer.
- A layer asked for out of order (an image encoded between tokens, a forward cut short) is a miss: the
  read-ahead is dropped and the reader starts again from that layer.
`prefetch=False` is the ablation: each layer is read only when its forward asks for it. `stats` counts what
was read and how long the model waited; with `progress` a tqdm bar per pass (stderr) shows layers/s and GB read.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import defaults
from ..checkpoint.loader import READ_WORKERS, Chunk, LoadPlan, apply_chunk, copy_chunks, fill_chunks
from ..checkpoint.pagecache import align_down, align_up, aligned_empty, drop, open_direct, read_direct
from ..checkpoint.safetensors_io import pread_into
from ..errors import CheckpointError
from ..units import GB
from .layout import Layout, layer_layout
from .residency import ResidencyPlan

PIECE_BYTES = 16 << 20  # the largest read of tensors stored as computed (a multiple of DIRECT_ALIGN)
MIN_PIECE_BYTES = 1 << 20  # the smallest, when a span is cut into one piece per reader
FREE, READING, READY, BOUND = "free", "reading", "ready", "bound"


@dataclass
class StreamStats:
    passes: dict[str, int] = field(default_factory=dict)  # group -> forwards that streamed it
    layers_read: int = 0
    bytes_read: int = 0  # checkpoint bytes
    read_s: float = 0.0  # the reader's time inside layer reads (conversion and quantization included)
    wait_s: float = 0.0  # the model's time blocked waiting for a layer
    misses: int = 0  # layers asked for out of the read-ahead order
    first_read: tuple[int, float] | None = None  # (bytes, seconds) of the first layer read: the disk rate

    @property
    def read_rate(self) -> float | None:
        return self.first_read[0] / self.first_read[1] if self.first_read and self.first_read[1] > 0 else None


@dataclass
class _Slot:
    buffer: torch.Tensor
    unit: int | None = None
    state: str = FREE
    discard: bool = False  # read-ahead that a miss made useless: freed when its read ends


class LayerStreamer:
    """Serves the streamed layers of `model` (see the module docstring). `load_plan` is the checkpoint matched
    to the model; `direct` None reads with O_DIRECT where the filesystem allows it, False never."""

    def __init__(
        self,
        model: nn.Module,
        plan: ResidencyPlan,
        load_plan: LoadPlan,
        *,
        prefetch: bool = True,
        progress: bool = False,
        workers: int = READ_WORKERS,
        direct: bool | None = None,
    ):
        self.plan, self.prefetch, self.progress = plan, prefetch, progress
        self.stats = StreamStats()
        self._units = list(plan.streamed)
        self._groups = [next(u.group for u in plan.units if u.name == name) for name in self._units]
        self._next = self._successors()
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._meta: dict[str, nn.Parameter] = {}
        self._params: list[list[str]] = []
        self._layouts: list[Layout] = []
        for name in self._units:
            module = model.get_submodule(name)
            params = {f"{name}.{n}": p for n, p in module.named_parameters()}
            for full, p in params.items():
                owner, _, leaf = full.rpartition(".")
                self._owners[full] = (model.get_submodule(owner), leaf)
                self._meta[full] = p
            self._params.append(list(params))
            self._layouts.append(layer_layout(params, load_plan.restrict(params)))
        size = max(layout.nbytes for layout in self._layouts)
        if size > plan.buffer_bytes:  # the plan's bound on alignment padding is wrong: a bug, not a user error
            raise AssertionError(f"a streamed layer needs {size} bytes, the plan allows {plan.buffer_bytes}")
        self._slots = [_Slot(aligned_empty(size)) for _ in range(plan.buffers)]
        self._direct: dict[Path, int] = {}  # shard -> O_DIRECT descriptor, where the filesystem takes it
        self._buffered: dict[Path, int] = {}  # shard -> plain descriptor (unaligned reads, dropping pages)
        self._open(load_plan, direct)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="layer-read")
        self._workers = workers
        self._chunk_bytes = defaults.STAGING_BYTES // workers
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        # The next layer to read, at once: the first decoder layer. Its read measures the disk (a whole layer,
        # cold); read ahead for the first token, it is wasted only when a streamed vision tower runs first.
        self._cursor: int | None = next((i for i, g in enumerate(self._groups) if g == "decoder"), 0)
        self._requested: int | None = self._cursor
        self._bar = None
        self._handles = self._hook(model)
        self._thread = threading.Thread(target=self._run, name="layer-streamer", daemon=True)
        self._thread.start()
        weakref.finalize(model, self.close)  # the streamer holds layers, never the model: the model can go

    def _open(self, load_plan: LoadPlan, direct: bool | None) -> None:
        for entry in [*load_plan.copies.values(), *(e for e, _ in load_plan.fills.values())]:
            if entry.path not in self._buffered:
                try:
                    self._buffered[entry.path] = os.open(entry.path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{entry.path}: cannot open ({e.strerror})") from None
                if hasattr(os, "posix_fadvise"):  # no read-ahead: it would cache bytes no read asked for
                    os.posix_fadvise(self._buffered[entry.path], 0, 0, os.POSIX_FADV_RANDOM)
                fd = open_direct(entry.path) if direct is not False else None
                if fd is not None:
                    self._direct[entry.path] = fd
                drop(self._buffered[entry.path])  # pages cached before (headers, other readers): not to be kept

    def _hook(self, model: nn.Module) -> list[RemovableHandle]:
        """Pre- and post-hooks on each streamed layer, and on the module running each group's layers (a pass)."""
        handles = []
        for i, name in enumerate(self._units):
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(partial(self._before, i)))
            handles.append(module.register_forward_hook(partial(self._after, i), always_call=True))
        for group in dict.fromkeys(self._groups):
            first = next(n for n, g in zip(self._units, self._groups) if g == group)
            parent = model.get_submodule(first.rsplit(".", 2)[0])  # "language_model.model.layers.3" -> "...model"
            handles.append(parent.register_forward_pre_hook(partial(self._pass_start, group)))
            handles.append(parent.register_forward_hook(self._pass_end, always_call=True))
        return handles

    @property
    def direct(self) -> bool:
        """Whether every shard is read with O_DIRECT (else buffered reads, pages dropped after each)."""
        return len(self._direct) == len(self._buffered)

    def _successors(self) -> list[int | None]:
        """The layer read after each: the next in its group; after the vision tower the first decoder layer;
        after the last decoder layer the first one again (the next token)."""
        first_decoder = next((i for i, g in enumerate(self._groups) if g == "decoder"), None)
        out: list[int | None] = []
        for i, group in enumerate(self._groups):
            last = i + 1 == len(self._groups) or self._groups[i + 1] != group
            out.append(i + 1 if not last else first_decoder)
        return out

    # --- the model's side: forward hooks ---------------------------------------------------------------------

    def _pass_start(self, group: str, module: nn.Module, args: tuple) -> None:
        from tqdm import tqdm

        self.stats.passes[group] = self.stats.passes.get(group, 0) + 1
        total = self._groups.count(group)
        self._bar = tqdm(total=total, unit="layer", desc=f"{group} pass", leave=False, file=sys.stderr,
                         disable=not self.progress, postfix=self._read_so_far())  # fmt: skip

    def _read_so_far(self) -> str:
        return f"{self.stats.bytes_read / GB:.2f} GB read"

    def _pass_end(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _holding(self, unit: int) -> _Slot | None:
        return next((s for s in self._slots if s.unit == unit and s.state != FREE and not s.discard), None)

    def _before(self, unit: int, module: nn.Module, args: tuple) -> None:
        t0 = time.perf_counter()
        with self._cond:
            self._requested = unit
            if self._holding(unit) is None and self._cursor != unit:  # a miss: drop the read-ahead, read this next
                self.stats.misses += self.prefetch
                for slot in self._slots:
                    if slot.state == READY:
                        self._release(slot)
                    elif slot.state == READING:
                        slot.discard = True
                self._cursor = unit
                self._cond.notify_all()
            while (slot := self._holding(unit)) is None or slot.state != READY:
                if self._error is not None:
                    raise CheckpointError(f"reading streamed layer {self._units[unit]} failed: {self._error}")
                self._cond.wait()
            slot.state = BOUND
            self._requested = None
        self.stats.wait_s += time.perf_counter() - t0
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._read_so_far(), refresh=False)

    def _after(self, unit: int, module: nn.Module, args: tuple, output: object) -> None:
        with self._cond:
            slot = next((s for s in self._slots if s.unit == unit and s.state == BOUND), None)
            if slot is not None:
                self._release(slot)
                self._cond.notify_all()

    def _release(self, slot: _Slot) -> None:
        """The slot's layer back on meta, the buffer free (call with the lock held)."""
        if slot.unit is not None:
            for name in self._params[slot.unit]:
                module, leaf = self._owners[name]
                module._parameters[leaf] = self._meta[name]
        slot.unit, slot.state, slot.discard = None, FREE, False

    # --- the reader's side -----------------------------------------------------------------------------------

    def _may_read(self) -> bool:
        u = self._cursor
        return (
            u is not None
            and self._error is None
            and (self.prefetch or self._requested == u)
            and self._holding(u) is None
            and any(s.state == FREE for s in self._slots)
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._may_read():
                    self._cond.wait()
                if self._closed:
                    return
                unit = self._cursor
                slot = next(s for s in self._slots if s.state == FREE)
                slot.unit, slot.state = unit, READING
                self._cursor = self._next[unit] if self.prefetch else None
            t0 = time.perf_counter()
            try:
                self._read(unit, slot)
                error = None
            except Exception as e:  # handed to the model's thread, which raises it in the layer's pre-hook
                error = e
            seconds = time.perf_counter() - t0
            with self._cond:
                if error is not None:
                    self._error = error
                    self._release(slot)
                else:
                    stored = self._layouts[unit].stored
                    self.stats.layers_read += 1
                    self.stats.bytes_read += stored
                    self.stats.read_s += seconds
                    self.stats.first_read = self.stats.first_read or (stored, seconds)
                    if slot.discard:
                        self._release(slot)
                    else:
                        slot.state = READY
                self._cond.notify_all()

    def _read(self, unit: int, slot: _Slot) -> None:
        """Read one layer into `slot`'s buffer and point its parameters there (the quantizing fills write
        through the module's parameters, so they are bound first)."""
        layout, buf = self._layouts[unit], slot.buffer
        views = {p.name: buf[p.start : p.start + p.nbytes].view(p.dtype).view(p.shape) for p in layout.places}
        for name, view in views.items():
            module, leaf = self._owners[name]
            module._parameters[leaf] = nn.Parameter(view, requires_grad=False)
        tasks = []
        for span in layout.spans:  # the file may end inside a span's last block: its tensors' bytes must arrive
            fd = self._direct.get(span.path)
            size = span.end - span.first
            step = min(PIECE_BYTES, max(MIN_PIECE_BYTES, align_up(size // self._workers)))  # every reader busy
            for o in range(0, size, step):
                piece = buf[span.at + o : span.at + min(size, o + step)]
                need = min(piece.numel(), span.data_end - span.first - o)
                if fd is None:  # buffered: only the bytes needed, pages dropped after each piece
                    tasks.append(partial(self._read_buffered, span.path, piece[:need], span.first + o))
                else:
                    tasks.append(partial(read_direct, fd, piece, span.first + o, need, span.path))
        chunks = [(e, c) for e, name in layout.copies for c in copy_chunks(e, views[name], self._chunk_bytes)]
        chunks += [(e, c) for e, rf in layout.fills for c in fill_chunks(e, rf, 0, self._chunk_bytes)]
        tasks += [partial(self._read_staged, entry.path, chunk) for entry, chunk in chunks]
        futures = [self._pool.submit(task) for task in tasks]
        try:
            for future in futures:
                future.result()
        except OSError as e:
            raise CheckpointError(f"read failed ({e.strerror})") from None
        finally:
            for future in futures:
                future.cancel()
            wait(futures)

    def _read_buffered(self, path: Path, out: torch.Tensor, offset: int) -> None:
        fd = self._buffered[path]
        pread_into(fd, out, offset, path)
        drop(fd, offset, out.numel())

    def _staging(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buffer", None)
        if buf is None or buf.numel() < nbytes:
            self._local.buffer = buf = aligned_empty(align_up(nbytes))
        return buf

    def _read_staged(self, path: Path, chunk: Chunk) -> None:
        """A chunk read into this worker's staging buffer, then converted or quantized into its parameter."""
        fd = self._direct.get(path)
        if fd is not None and chunk.offset % chunk.dtype.itemsize == 0:
            start = align_down(chunk.offset)
            n = align_up(chunk.offset + chunk.nbytes) - start
            stage = self._staging(n)
            read_direct(fd, stage[:n], start, chunk.offset + chunk.nbytes - start, path)
            raw = stage[chunk.offset - start : chunk.offset - start + chunk.nbytes]
        else:
            raw = self._staging(chunk.nbytes)[: chunk.nbytes]
            self._read_buffered(path, raw, chunk.offset)
        apply_chunk(chunk, raw.view(chunk.dtype))

    # --- the caller's side -----------------------------------------------------------------------------------

    def read_rate(self, timeout: float | None = None) -> float | None:
        """Bytes per second of the first layer read (read at start-up), waiting for it up to `timeout` s."""
        with self._cond:
            self._cond.wait_for(lambda: self.stats.first_read is not None or self._error is not None, timeout)
        return self.stats.read_rate

    def close(self) -> None:
        """Stop the reader, free the buffers, close the files; the streamed layers are left on meta."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._pool.shutdown()
        for handle in self._handles:
            handle.remove()
        with self._cond:
            for slot in self._slots:
                self._release(slot)
            self._slots.clear()
        for fd in [*self._direct.values(), *self._buffered.values()]:
            os.close(fd)
        self._direct.clear()
        self._buffered.clear()
