"""Stream a safetensors checkpoint into any `nn.Module` built on `meta`, at the memory floor.

Knows nothing of PaliGemma (pretrained.py has the entry points). How a tensor travels
(docs/architecture.md has the picture):
1. Every shard header is read and checked before anything is allocated (safetensors_io.py).
2. Stored keys are mapped to parameter names by the caller's `key_map` and matched 1:1 against the
   meta module's parameters: missing, unexpected and wrong-shape keys are one sorted error, before
   any allocation. Keys in `tied` are stored copies of a parameter (an lm_head equal to the
   embedding): their shape is checked and their bytes are not read.
3. The memory pre-flight compares the bytes the parameters will take (from the headers) with the
   memory available now.
4. The module is cast to the target dtype *on meta* (casting after `to_empty` would commit every page
   twice), then `to_empty` allocates it once, uninitialised.
5. Shards are opened one at a time and read with explicit preads at the header offsets, 4 in flight.
   A tensor stored in the target dtype is read straight into its parameter; any other is read in
   chunks into per-thread staging buffers and converted by `copy_`, so a float32 embedding (2.1 GB)
   never exists whole: `chunk_bytes` bounds every temporary.
`to_empty` unties shared parameters and leaves non-persistent buffers as garbage: the caller's `tie`
and `repair` hooks put them right after materialisation.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, InsufficientMemoryError
from .safetensors_io import WEIGHT_DTYPES, TensorEntry, dtype_name, pread_into, read_checkpoint
from .units import format_bytes

DEFAULT_CHUNK_BYTES = 64 << 20  # bound on the temporaries alive beyond the model (source-dtype rows)
READ_WORKERS = 4  # reads in flight: a cold shard streams faster with several (docs/results/kernels.md)
RUNTIME_MARGIN_BYTES = 300 << 20  # interpreter, torch, tokenizer and the read chunks, roughly

KeyMap = Callable[[str], "str | None"]


# --- matching keys to parameters (on meta: costs nothing) ------------------------------------------------


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def match_entries(
    model: nn.Module, entries: dict[str, TensorEntry], key_map: KeyMap, tied: Mapping[str, str] | None = None
) -> dict[str, TensorEntry]:
    """Parameter name -> checkpoint entry, every parameter exactly once, or a CheckpointError.

    `key_map(stored_key)` gives a parameter name, or None for a key the module does not have. A mapped
    name found in `tied` is a stored copy of the parameter `tied[name]`: shape-checked, then skipped.
    """
    tied = tied or {}
    params = dict(model.named_parameters())
    plan: dict[str, TensorEntry] = {}
    copies: list[tuple[TensorEntry, str]] = []
    unexpected = []
    for key, entry in entries.items():
        name = key_map(key)
        if name in tied:
            copies.append((entry, tied[name]))
        elif name is None or name not in params:
            unexpected.append(key)
        elif name in plan:
            raise CheckpointError(f"{entry.path}: {key!r} and {plan[name].key!r} both map to parameter {name!r}")
        else:
            plan[name] = entry
    missing = [n for n in params if n not in plan]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s): {_listing(unexpected)}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    for name, entry in plan.items():
        want = list(params[name].shape)
        if tuple(want) != entry.shape:
            raise CheckpointError(
                f"{entry.path}: {entry.key!r} has shape {list(entry.shape)}, the model expects {want}"
            )
        if entry.dtype.is_floating_point != params[name].dtype.is_floating_point:  # int bits are not weights
            raise CheckpointError(f"{entry.path}: {entry.key!r} is stored as {dtype_name(entry.dtype)}, not floats")
    for entry, target in copies:  # a stored tied copy must have its parameter's shape; its values are not used
        if entry.shape != tuple(params[target].shape):
            raise CheckpointError(f"{entry.path}: {entry.key!r} shape {list(entry.shape)} is not {target}'s")
    return plan


# --- the memory pre-flight -------------------------------------------------------------------------------


def load_bytes(plan: dict[str, TensorEntry], dtype: torch.dtype) -> int:
    """Bytes the loaded parameters occupy in `dtype` (read from the headers, before any allocation)."""
    return sum(e.numel * dtype.itemsize for e in plan.values())


def available_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_memory(
    plan: dict[str, TensorEntry],
    dtype: torch.dtype,
    device: torch.device | str,
    chunk_bytes: int,
    reserve: Mapping[str, int] | None = None,
) -> None:
    """Refuse a load that would not fit. `reserve` names what the caller needs beside the weights, by part
    (e.g. a request's KV cache and activations: memory.py), so the message can say what takes the room."""
    reserve = reserve or {}
    weights = load_bytes(plan, dtype)
    need = weights + chunk_bytes + RUNTIME_MARGIN_BYTES + sum(reserve.values())
    have = available_bytes(device)
    if need > have:
        where = torch.device(device).type
        parts = "".join(f", {name} {format_bytes(n)}" for name, n in reserve.items())
        breakdown = f" (weights {format_bytes(weights)}{parts})" if reserve else ""
        advice = " or load in a 16-bit dtype" if dtype == torch.float32 else ""
        advice += ", ask for a shorter request" if reserve else ""
        raise InsufficientMemoryError(
            f"loading needs about {format_bytes(need)} of {where} memory{breakdown} but {format_bytes(have)} is "
            f"available; close other programs{advice}, or skip this check (--force / preflight=False)"
        )


# --- materialise and stream ------------------------------------------------------------------------------


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Meta model -> uninitialised model on `device`: cast on meta first so pages are committed once."""
    model.to(dtype=dtype)  # on meta: changes the dtype, allocates nothing
    return model.to_empty(device=device)


@dataclass(frozen=True)
class _Chunk:
    """One bounded read: the bytes at file `offset` into `dest` (a flat slice of a parameter)."""

    offset: int
    dest: torch.Tensor
    dtype: torch.dtype  # stored dtype of the bytes


def _chunks(entry: TensorEntry, dest: torch.Tensor, chunk_bytes: int) -> list[_Chunk]:
    flat = dest.view(-1)  # parameters are contiguous after to_empty
    step = max(1, chunk_bytes // entry.dtype.itemsize)  # elements per chunk
    return [
        _Chunk(entry.offset + e0 * entry.dtype.itemsize, flat[e0 : e0 + step], entry.dtype)
        for e0 in range(0, entry.numel, step)
    ]


def _read_chunk(fd: int, path: Path, chunk: _Chunk, local: threading.local, chunk_bytes: int) -> None:
    """Same dtype on the CPU: the bytes land in the parameter itself. Otherwise they are read into this
    thread's reused staging buffer (stored dtype) and `copy_` converts them into the final pages."""
    if chunk.dtype == chunk.dest.dtype and chunk.dest.device.type == "cpu":
        pread_into(fd, chunk.dest, chunk.offset, path)
        return
    if not hasattr(local, "buffer"):
        local.buffer = torch.empty(chunk_bytes, dtype=torch.uint8)
    staged = local.buffer[: chunk.dest.numel() * chunk.dtype.itemsize].view(chunk.dtype)
    pread_into(fd, staged, chunk.offset, path)
    with torch.no_grad():  # grad mode is per thread: this is a worker
        chunk.dest.copy_(staged)  # dtype conversion (and host-to-device copy) happens here


def _by_file(plan: dict[str, TensorEntry]) -> dict[Path, list[tuple[str, TensorEntry]]]:
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for name, entry in plan.items():
        by_file.setdefault(entry.path, []).append((name, entry))
    return by_file


def stream_into(
    model: nn.Module,
    plan: dict[str, TensorEntry],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_phase: Callable[[str], None] | None = None,
    progress: bool = False,
    workers: int = READ_WORKERS,
) -> None:
    """Fill every planned parameter in place, one shard open at a time, chunks in file order.

    `workers` threads keep that many reads in flight (pread and copy_ release the GIL); each converting
    thread owns one staging buffer of chunk_bytes / workers, so chunk_bytes bounds all temporaries. The
    progress bar (stderr) counts the bytes of the loaded parameters, the size the model ends up.
    """
    from tqdm import tqdm

    params = dict(model.named_parameters())
    per_thread = max(1 << 20, chunk_bytes // workers)
    local = threading.local()
    total = sum(params[name].nbytes for name in plan)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress, leave=False)
    with torch.no_grad(), bar, ThreadPoolExecutor(workers) as pool:
        by_file = _by_file(plan)
        for i, (path, items) in enumerate(by_file.items(), 1):
            if on_phase:
                on_phase(f"shard {i}/{len(by_file)}")
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
            futures = []
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead: the file is read once
                ordered = sorted(items, key=lambda item: item[1].offset)
                chunks = [c for name, entry in ordered for c in _chunks(entry, params[name], per_thread)]
                futures = [pool.submit(_read_chunk, fd, path, c, local, per_thread) for c in chunks]
                for chunk, future in zip(chunks, futures):
                    future.result()  # re-raises the first failure
                    bar.update(chunk.dest.nbytes)
            except OSError as e:
                raise CheckpointError(f"{path}: read failed ({e.strerror})") from None
            finally:  # on failure: drop what has not started, let running reads finish, then close
                for future in futures:
                    future.cancel()
                wait(futures)
                os.close(fd)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def map_into(model: nn.Module, plan: dict[str, TensorEntry], dtype: torch.dtype) -> None:
    """Zero-copy: every parameter becomes a view of its shard's pages (private, copy-on-write mapping).

    Nothing is read up front; pages come in on first use and count as file-backed RSS, which the kernel
    can drop and re-read under pressure. The price: the first forward pays the disk reads, and the files
    must stay in place while the model lives.
    """
    wrong = sorted({dtype_name(e.dtype) for e in plan.values() if e.dtype != dtype})
    if wrong:
        raise CheckpointError(
            f"zero-copy needs a checkpoint stored in {dtype_name(dtype)}, this one holds {', '.join(wrong)}; "
            "convert it once with `lowmem-paligemma convert` or load without zero-copy"
        )
    for path, items in _by_file(plan).items():
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, entry in items:
            view = torch.frombuffer(mapped, dtype=dtype, count=entry.numel, offset=entry.offset)
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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_phase: Callable[[str], None] | None = None,
) -> nn.Module:
    """Fill any `nn.Module` built on `meta` from a safetensors checkpoint directory, in eval mode.

    `key_map` maps a stored key to a parameter name (None: unexpected); `tied` names stored copies of a
    parameter to skip (see `match_entries`). `tie` re-ties shared parameters after materialisation;
    `repair` rebuilds non-persistent buffers. `preflight` refuses a load that would not fit in the memory
    available now, counting `reserve` (bytes by name the caller needs beside the weights). Errors are raised
    before any allocation where the headers can tell (keys, shapes, memory), and nothing half-loaded is returned.
    """
    if dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"dtype {dtype} is not one of {', '.join(WEIGHT_DTYPES)}")
    if zero_copy and torch.device(device).type != "cpu":
        raise ValueError("zero-copy maps files into CPU memory; it cannot target another device")
    phase = on_phase or (lambda name: None)
    entries = read_checkpoint(Path(model_dir))
    plan = match_entries(model, entries, key_map, tied)  # on meta: a mismatch costs nothing
    if preflight and not zero_copy:
        check_memory(plan, dtype, device, chunk_bytes, reserve)
    if zero_copy:
        phase("map")
        map_into(model, plan, dtype)
    else:
        phase("materialize")
        materialize(model, dtype, device)
    if tie:
        tie(model)
    if repair:
        phase("repair")
        repair(model)
    if not zero_copy:
        stream_into(model, plan, chunk_bytes, on_phase=phase, progress=progress)
    phase("done")
    return model.eval()
