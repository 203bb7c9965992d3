"""Stream a safetensors checkpoint into any `nn.Module` built on `meta`, at the memory floor.

Knows nothing of PaliGemma (pretrained/load.py has the entry points). How a tensor travels
(docs/architecture.md has the picture):
1. Every shard header is read and checked before anything is allocated (safetensors_io.py).
2. Stored keys are mapped to parameter names by the caller's `key_map` and matched 1:1 against the
   meta module's parameters: missing, unexpected and wrong-shape keys are one sorted error, before
   any allocation. Keys in `tied` are stored copies of a parameter (an lm_head equal to the
   embedding): their shape is checked and their bytes are not read.
3. The memory pre-flight compares the bytes the parameters will take (from the headers) with the
   memory available now.
4. The module is cast to the target dtype *on meta* (casting after allocating would commit every page
   twice), then each tensor is allocated once, uninitialised (as `to_empty` would).
5. Shards are opened one at a time and read with explicit preads at the header offsets, 4 in flight.
   A tensor stored in the target dtype is read straight into its parameter; any other is converted
   (`copy_`, or a format's fill: quantized) in chunks, so a float32 embedding (2.1 GB) never exists
   whole: `chunk_bytes` bounds every temporary. A chunk whose pages the page cache holds is converted
   from them in place (pagecache.cached_view), others are read into per-thread staging buffers first.
`to_empty` unties shared parameters and leaves non-persistent buffers as garbage: the caller's `tie`
and `repair` hooks put them right after materialisation.
Parameters named in `exclude` stay on meta, unread: streamer.py reads them per forward with the same
chunks (`copy_chunks`, `fill_chunks`, `apply_chunk`) into buffers of its own (residency.py plans which).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import defaults
from ..errors import CheckpointError
from . import preflight as memory_check
from .pagecache import cached_view, drop, prefer_huge_pages
from .safetensors_io import WEIGHT_DTYPES, TensorEntry, dtype_name, pread_into, read_checkpoint

READ_WORKERS = 4  # reads in flight: a cold shard streams faster with several (docs/results/kernels.md)
# Chunks converted in place from the page cache at once: each conversion runs on every core already (a native
# quantizer's parallel_for), so more at once only oversubscribe the cores; two let one's page faults overlap the
# other's arithmetic. On the AMX Xeon, a quantizing int8 load by hand, medians of 5: 1.73 s with two, 1.82 with one,
# 1.89 with four (docs/performance.md).
IN_PLACE_AT_ONCE = 2
FILL_BYTES_PER_ELEMENT = 16  # a quantizing fill's temporaries in torch (float32 copy, scaled, rounded, int32 codes)

KeyMap = Callable[[str], "str | None"]


# --- matching stored tensors to parameters (on meta: costs nothing) --------------------------------------


@dataclass(frozen=True)
class RowFill:
    """Parameters filled from one stored tensor a few rows at a time, e.g. quantized while it streams.

    A module offers these through a `row_fills()` method: {stored local name: RowFill}. A stored tensor
    whose dtype and shape equal a parameter's is copied instead (a checkpoint already in the format).
    `fill` only reads its rows: they may be the page cache's own pages, mapped read-only (`read_chunk`).
    """

    shape: tuple[int, ...]  # the stored tensor's shape
    fill: Callable[[torch.Tensor, int], None]  # (rows (n, *shape[1:]) in the stored dtype, first row)
    fills: tuple[str, ...]  # the module's parameters it writes (local names)
    row_multiple: int = 1  # every chunk but the last holds a multiple of this many rows
    dtypes: tuple[torch.dtype, ...] = ()  # the stored dtypes it takes (empty: any)
    temporaries: int = FILL_BYTES_PER_ELEMENT  # bytes it holds per stored element beyond the rows themselves


@dataclass
class LoadPlan:
    copies: dict[str, TensorEntry]  # parameter name -> the stored tensor read into it
    fills: dict[str, tuple[TensorEntry, RowFill]]  # stored name (mapped) -> the tensor and what its rows fill

    def filled(self, name: str) -> list[str]:
        """The parameters the fill `name` writes (full names)."""
        prefix = name.rpartition(".")[0]
        return [f"{prefix}.{p}" if prefix else p for p in self.fills[name][1].fills]

    def restrict(self, names: Collection[str]) -> LoadPlan:
        """The part of the plan that writes the parameters in `names`."""
        return LoadPlan(
            {n: e for n, e in self.copies.items() if n in names},
            {n: f for n, f in self.fills.items() if all(p in names for p in self.filled(n))},
        )


def row_fills(model: nn.Module) -> dict[str, RowFill]:
    """Every `row_fills()` offer of the model's modules, by full (mapped) name."""
    out = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "row_fills"):
            out |= {f"{prefix}.{local}" if prefix else local: rf for local, rf in module.row_fills().items()}
    return out


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def match_entries(
    model: nn.Module, entries: dict[str, TensorEntry], key_map: KeyMap, tied: Mapping[str, str] | None = None
) -> LoadPlan:
    """Every parameter filled exactly once from the stored tensors, or a CheckpointError listing what is not.

    `key_map(stored_key)` gives a parameter name (or a `row_fills` name), or None for a key the module does
    not have. A mapped name found in `tied` is a stored copy of the parameter `tied[name]`: shape-checked,
    then skipped.
    """
    tied = tied or {}
    params = dict(model.named_parameters())
    offers = row_fills(model)
    plan = LoadPlan({}, {})
    copies: list[tuple[TensorEntry, str]] = []
    unexpected = []
    for key, entry in entries.items():
        name = key_map(key)
        if name in tied:
            copies.append((entry, tied[name]))
        elif name in plan.copies or name in plan.fills:
            other = (plan.copies.get(name) or plan.fills[name][0]).key
            raise CheckpointError(f"{entry.path}: {key!r} and {other!r} both map to parameter {name!r}")
        elif name in params and (name not in offers or entry.dtype == params[name].dtype):
            want = tuple(params[name].shape)
            if want != entry.shape:
                raise CheckpointError(
                    f"{entry.path}: {key!r} has shape {list(entry.shape)}, the model expects {list(want)}"
                )
            if entry.dtype.is_floating_point != params[name].dtype.is_floating_point:  # int bits are not weights
                raise CheckpointError(f"{entry.path}: {key!r} is stored as {dtype_name(entry.dtype)}, not floats")
            plan.copies[name] = entry
        elif name in offers:
            if offers[name].shape != entry.shape:
                raise CheckpointError(
                    f"{entry.path}: {key!r} has shape {list(entry.shape)}, the model expects {list(offers[name].shape)}"
                )
            if offers[name].dtypes and entry.dtype not in offers[name].dtypes:
                want = " or ".join(dtype_name(d) for d in offers[name].dtypes)
                raise CheckpointError(f"{entry.path}: {key!r} is stored as {dtype_name(entry.dtype)}, not {want}")
            plan.fills[name] = (entry, offers[name])
        else:
            unexpected.append(key)
    covered = set(plan.copies)
    for name, (entry, _) in plan.fills.items():
        filled = set(plan.filled(name))
        if twice := covered & filled:  # e.g. a float weight stored beside its pre-quantized form
            raise CheckpointError(f"{entry.path}: {entry.key!r} fills {_listing(twice)}, another tensor does too")
        covered |= filled
    missing = [n for n in params if n not in covered]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s): {_listing(unexpected)}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    for entry, target in copies:  # a stored tied copy must have its parameter's shape; its values are not used
        if entry.shape != tuple(params[target].shape):
            raise CheckpointError(f"{entry.path}: {entry.key!r} shape {list(entry.shape)} is not {target}'s")
    return plan


def checkpoint_plan(
    model: nn.Module, model_dir: str | os.PathLike, key_map: KeyMap, tied: Mapping[str, str] | None = None
) -> LoadPlan:
    """The headers of the checkpoint in `model_dir` matched against `model` (see `match_entries`)."""
    return match_entries(model, read_checkpoint(Path(model_dir)), key_map, tied)


# --- materialise and stream ------------------------------------------------------------------------------


def materialize(
    model: nn.Module, dtype: torch.dtype, device: torch.device | str, exclude: Collection[str] = ()
) -> nn.Module:
    """Meta model -> uninitialised model on `device`: cast on meta first so pages are committed once.
    Only floating-point parameters take `dtype` (quantized weights stay int8 / uint8). Parameters named in
    `exclude` stay on meta (residency.py streams them in per forward)."""
    model.to(dtype=dtype)  # on meta: changes the dtype, allocates nothing
    # `to_empty`, one tensor at a time, by `torch.empty`: `empty_like` of a meta tensor runs torch._refs in Python,
    # whose first use imports sympy (~0.5 s of a 2 s load from the page cache).
    for prefix, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if (f"{prefix}.{leaf}" if prefix else leaf) not in exclude:
                empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                module._parameters[leaf] = nn.Parameter(empty, requires_grad=p.requires_grad)
        for leaf, b in module.named_buffers(recurse=False):
            module._buffers[leaf] = torch.empty(b.shape, dtype=b.dtype, device=device)
    for p in model.parameters():  # before the first byte lands: fewer, larger page faults
        if not p.is_meta:
            prefer_huge_pages(p)
    return model


@dataclass(frozen=True)
class Chunk:
    """One bounded read of `nbytes` at file `offset`: into `dest` (a flat slice of a parameter), or its rows
    handed to `fill` starting at row `start`."""

    offset: int
    nbytes: int
    dtype: torch.dtype  # stored dtype of the bytes
    dest: torch.Tensor | None = None
    fill: Callable[[torch.Tensor, int], None] | None = None
    row_shape: tuple[int, ...] = ()  # the stored tensor's shape after dim 0 (fills)
    start: int = 0  # first row (fills)
    done: int = 0  # bytes of loaded parameters this chunk completes (progress)
    param: str = ""  # the parameter a copy fills (for `finish`)


def copy_chunks(entry: TensorEntry, dest: torch.Tensor, chunk_bytes: int, param: str = "") -> list[Chunk]:
    flat = dest.view(-1)  # parameters are contiguous after to_empty
    step = max(1, chunk_bytes // entry.dtype.itemsize)  # elements per chunk
    size = entry.dtype.itemsize
    return [
        Chunk(entry.offset + e0 * size, min(step, entry.numel - e0) * size, entry.dtype,
               dest=flat[e0 : e0 + step], done=min(step, entry.numel - e0) * dest.element_size(), param=param)
        for e0 in range(0, entry.numel, step)
    ]  # fmt: skip


def fill_chunks(entry: TensorEntry, rf: RowFill, filled_bytes: int, chunk_bytes: int) -> list[Chunk]:
    rows = entry.shape[0]
    row_bytes = entry.nbytes // max(rows, 1)
    # A fill may hold temporaries of its rows (float32 / int32 copies in torch): size chunks by the rows and those,
    # so chunk_bytes bounds them.
    per = max(1, chunk_bytes // max(1, row_bytes + row_bytes // entry.dtype.itemsize * rf.temporaries))
    per = max(rf.row_multiple, per // rf.row_multiple * rf.row_multiple)
    return [
        Chunk(entry.offset + r0 * row_bytes, min(per, rows - r0) * row_bytes, entry.dtype, fill=rf.fill,
               row_shape=entry.shape[1:], start=r0, done=filled_bytes * min(per, rows - r0) // rows)
        for r0 in range(0, rows, per)
    ]  # fmt: skip


def read_chunk(
    fd: int,
    path: Path,
    chunk: Chunk,
    local: threading.local,
    drop_cache: bool = False,
    in_place: threading.Semaphore | None = None,
) -> None:
    """Same dtype on the CPU: the bytes land in the parameter itself. Otherwise `copy_` converts them into the
    final pages or the fill computes from them: in place where the page cache holds them all (with `in_place`,
    which bounds the conversions in place at once), else read first into this thread's reused staging buffer
    (stored dtype). `drop_cache`: the chunk's file pages are evicted once read."""
    if chunk.dest is not None and chunk.dtype == chunk.dest.dtype and chunk.dest.device.type == "cpu":
        pread_into(fd, chunk.dest, chunk.offset, path)
        if drop_cache:
            drop(fd, chunk.offset, chunk.nbytes)
        return
    if in_place is not None and not drop_cache:
        # The slot is taken before the mapping and given back after it is unmapped: it bounds the chunks whose pages
        # are mapped at once (the file-backed RSS), not only the conversions.
        with in_place, cached_view(fd, chunk.offset, chunk.nbytes) as view:
            if view is not None:
                apply_chunk(chunk, view.view(chunk.dtype))
                return
    if getattr(local, "buffer", None) is None or local.buffer.numel() < chunk.nbytes:
        local.buffer = torch.empty(chunk.nbytes, dtype=torch.uint8)
    staged = local.buffer[: chunk.nbytes].view(chunk.dtype)
    pread_into(fd, staged, chunk.offset, path)
    if drop_cache:
        drop(fd, chunk.offset, chunk.nbytes)
    apply_chunk(chunk, staged)


def apply_chunk(chunk: Chunk, staged: torch.Tensor) -> None:
    """Convert the chunk's bytes, read into `staged` (its stored dtype, flat), into their parameter."""
    with torch.no_grad():  # grad mode is per thread: this runs in workers
        if chunk.dest is not None:
            chunk.dest.copy_(staged)  # dtype conversion (and host-to-device copy) happens here
        else:
            chunk.fill(staged.view(-1, *chunk.row_shape), chunk.start)


def _by_file(plan: LoadPlan, params: dict[str, torch.Tensor], chunk_bytes: int):
    """Chunks grouped by shard, each shard's in file order."""
    by_file: dict[Path, list[Chunk]] = {}
    for name, entry in plan.copies.items():
        by_file.setdefault(entry.path, []).extend(copy_chunks(entry, params[name], chunk_bytes, name))
    for name, (entry, rf) in plan.fills.items():
        filled = sum(params[p].nbytes for p in plan.filled(name))
        by_file.setdefault(entry.path, []).extend(fill_chunks(entry, rf, filled, chunk_bytes))
    return {path: sorted(chunks, key=lambda c: c.offset) for path, chunks in by_file.items()}


def stream_into(
    model: nn.Module,
    plan: LoadPlan,
    chunk_bytes: int = defaults.CHUNK_BYTES,
    on_phase: Callable[[str], None] | None = None,
    progress: bool = False,
    workers: int = READ_WORKERS,
    drop_cache: bool = False,
    finish: Callable[[str], None] | None = None,
) -> None:
    """Fill every planned parameter in place, one shard open at a time, chunks in file order.

    `workers` threads keep that many reads in flight (pread, copy_ and the fills' torch ops release the GIL);
    each converting thread owns one staging buffer of about chunk_bytes / workers, so chunk_bytes bounds the
    temporaries. The progress bar (stderr) counts the bytes of the loaded parameters: the model's size.
    `drop_cache` evicts each chunk's file pages from the page cache once read (pagecache.py): the model's
    copy is the one that counts, and on a small machine the cached one would take the same RAM again.
    `finish(name)` runs on one more thread as soon as the copied parameter `name` is complete, while the
    reads go on (e.g. reordering a weight into a kernel's layout: hidden behind the disk on a cold load).
    """
    from tqdm import tqdm

    per_thread = max(1 << 20, chunk_bytes // workers)
    local, in_place = threading.local(), threading.BoundedSemaphore(IN_PLACE_AT_ONCE)
    # Chunks hold views of the parameters they fill: each is dropped once read, so a weight `finish` replaces
    # (a reordered copy) frees its old pages at once instead of at the end of the load.
    by_file = _by_file(plan, dict(model.named_parameters()), per_thread)
    total = sum(c.done for chunks in by_file.values() for c in chunks)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress, leave=False)
    left = Counter(c.param for chunks in by_file.values() for c in chunks if c.param)
    finishing: list[Future] = []
    with torch.no_grad(), bar, ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as finisher:
        for i, (path, chunks) in enumerate(by_file.items(), 1):
            if on_phase:
                on_phase(f"shard {i}/{len(by_file)}")
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
            futures = []
            try:
                # Read once: a larger read-ahead; or, when the pages are dropped after use, none at all, since a
                # read-ahead still in flight when they are dropped would land in the cache afterwards.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if drop_cache else os.POSIX_FADV_SEQUENTIAL)
                futures = [pool.submit(read_chunk, fd, path, c, local, drop_cache, in_place) for c in chunks]
                for j, future in enumerate(futures):
                    future.result()  # re-raises the first failure
                    chunk, chunks[j] = chunks[j], None
                    bar.update(chunk.done)
                    if finish and chunk.param:
                        left[chunk.param] -= 1
                        if not left[chunk.param]:
                            finishing.append(finisher.submit(_finish, finish, chunk.param))
            except OSError as e:
                raise CheckpointError(f"{path}: read failed ({e.strerror})") from None
            finally:  # on failure: drop what has not started, let running reads finish, then close
                for future in futures:
                    future.cancel()
                wait(futures)
                if drop_cache:  # read-ahead may have cached bytes no chunk read (skipped or excluded tensors)
                    drop(fd)
                os.close(fd)
        for future in finishing:
            future.result()  # re-raises a failed finish


def _finish(finish: Callable[[str], None], name: str) -> None:
    with torch.no_grad():  # grad mode is per thread: this is a worker
        finish(name)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def map_into(model: nn.Module, plan: LoadPlan, dtype: torch.dtype) -> None:
    """Zero-copy: every copied parameter becomes a view of its shard's pages (private, copy-on-write mapping).

    Nothing is read up front; pages come in on first use and count as file-backed RSS, which the kernel
    can drop and re-read under pressure. The price: the first forward pays the disk reads, and the files
    must stay in place while the model lives. Needs every copied tensor stored as loaded (`dtype` for
    floating point ones). What is computed on the way (the plan's fills: quantized or repacked while
    loading) cannot be a view of the file: those parameters get fresh memory here, for `stream_into`.
    """
    params = dict(model.named_parameters())

    def loaded_dtype(name: str) -> torch.dtype:
        return dtype if params[name].is_floating_point() else params[name].dtype

    wrong = sorted({dtype_name(e.dtype) for n, e in plan.copies.items() if e.dtype != loaded_dtype(n)})
    if wrong:
        raise CheckpointError(
            f"zero-copy needs a checkpoint stored in {dtype_name(dtype)} (or pre-quantized), this one holds "
            f"{', '.join(wrong)}; convert it once with `lowmem-paligemma convert` or load without zero-copy"
        )
    for name, (_, rf) in plan.fills.items():
        prefix = name.rpartition(".")[0]
        for filled in (f"{prefix}.{p}" if prefix else p for p in rf.fills):
            _set_parameter(model, filled, torch.empty(params[filled].shape, dtype=loaded_dtype(filled)))
    for path in {e.path for e in plan.copies.values()}:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, entry in plan.copies.items():
            if entry.path == path:
                view = torch.frombuffer(mapped, dtype=entry.dtype, count=entry.numel, offset=entry.offset)
                _set_parameter(model, name, view.view(entry.shape))


# --- the one entry point ---------------------------------------------------------------------------------


def stream_checkpoint(
    model: nn.Module,
    model_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    *,
    key_map: KeyMap = lambda key: key,
    tied: Mapping[str, str] | None = None,
    tie: Callable[[nn.Module], None] | None = None,
    repair: Callable[[nn.Module], None] | None = None,
    zero_copy: bool = False,
    preflight: bool = True,
    reserve: Mapping[str, int] | None = None,
    progress: bool = False,
    chunk_bytes: int = defaults.CHUNK_BYTES,
    advice: str = "",
    on_phase: Callable[[str], None] | None = None,
    exclude: Collection[str] = (),
    drop_cache: bool = False,
    finish: Callable[[str], None] | None = None,
) -> nn.Module:
    """Fill any `nn.Module` built on `meta` from a safetensors checkpoint directory, in eval mode.

    `key_map` maps a stored key to a parameter name (None: unexpected); `tied` names stored copies of a
    parameter to skip (see `match_entries`). `tie` re-ties shared parameters after materialisation;
    `repair` rebuilds non-persistent buffers. `preflight` refuses a load that would not fit in the memory
    available now (the parameters, a chunk and `reserve`: bytes by name the caller needs beside the weights,
    named in the message), with `advice` (", or ...") in its message. Modules with a `row_fills()` method
    are filled through it (quantized while streaming, see `RowFill`). Errors are raised before any allocation
    where the headers can tell (keys, shapes, memory), and nothing half-loaded is returned.
    Parameters named in `exclude` are checked against the checkpoint like the others but stay on meta,
    unread (residency.py streams them per forward); `drop_cache` evicts what was read from the page cache;
    `finish(name)` is called as each copied parameter completes (see `stream_into`).
    """
    if dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"dtype {dtype} is not one of {', '.join(WEIGHT_DTYPES)}")
    if zero_copy and (torch.device(device).type != "cpu" or exclude):
        raise ValueError("zero-copy maps whole files into CPU memory; it cannot target another device or skip any")
    phase = on_phase or (lambda name: None)
    plan = checkpoint_plan(model, model_dir, key_map, tied)  # on meta: a mismatch costs nothing
    if exclude:
        plan = plan.restrict({name for name, _ in model.named_parameters()} - set(exclude))
    if preflight and not zero_copy:
        advice += " or load in a 16-bit dtype" if dtype == torch.float32 else ""
        need = memory_check.memory_needed(model, dtype, chunk_bytes, exclude)
        memory_check.check_memory(need, device, advice, reserve)
    if zero_copy:
        phase("map")
        map_into(model, plan, dtype)
    else:
        phase("materialize")
        materialize(model, dtype, device, exclude)
    if tie:
        tie(model)
    if repair:
        phase("repair")
        repair(model)
    if not zero_copy or plan.fills:  # zero-copy: only what is computed while loading is read
        todo = LoadPlan({}, plan.fills) if zero_copy else plan
        stream_into(model, todo, chunk_bytes, on_phase=phase, progress=progress, drop_cache=drop_cache, finish=finish)
    phase("done")
    return model.eval()
