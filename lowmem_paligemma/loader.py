"""Streaming low-RAM loader: meta build -> cast on meta -> to_empty -> fill shard by shard, chunk by chunk.

How a tensor travels (docs/architecture.md has the picture):
1. Every shard header is read and checked before anything is allocated (`read_header`): the loader
   knows each tensor's file, dtype, shape and byte range, and refuses a bad checkpoint up front.
2. The model is built on `meta` (zero bytes), cast to the target dtype *on meta* (casting after
   `to_empty` would commit every page twice), then `to_empty` allocates it once, uninitialised.
3. Checkpoint keys are normalised (the four writers' prefixes, SPEC §2.3) and matched 1:1 against
   the parameters: missing, unexpected and wrong-shape keys are one readable error, before any read.
4. Shards are opened one at a time and read with explicit `pread`s at the offsets the header gave (no
   mmap: no file-backed RSS residue). A tensor stored in the target dtype is read straight into its
   parameter; any other is read in chunks of at most `chunk_bytes` into one reused buffer and converted
   by `copy_`, so a float32 embedding (2.1 GB) never exists whole.
5. Buffers: our model has none (rope tables and positions are computed on the fly); a module that
   has some gets them rebuilt by the caller's `repair` hook after materialisation.
The output head is the embedding table itself, so tying cannot be lost.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, load_config
from .paligemma import PaliGemmaForConditionalGeneration

DEFAULT_CHUNK_BYTES = 64 << 20  # bound on the one temporary alive beyond the model (source-dtype rows)
LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# safetensors dtype names -> torch dtypes we can convert from.
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem on one line."""


@dataclass(frozen=True)
class TensorEntry:
    path: Path  # shard file
    key: str  # name as stored in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute file offset of the first byte

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# --- reading and checking headers ------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file too short for a safetensors header ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    entries, spans = {}, []
    for key, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if dtype_name not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype_name!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed shape or offsets")
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                f"{path}: tensor {key!r} bytes [{begin}, {end}) lie outside the data ({data_size} bytes; truncated?)"
            )
        entry = TensorEntry(path, key, _ST_DTYPES[dtype_name], shape, end - begin, 8 + n + begin)
        if entry.numel * entry.dtype.itemsize != entry.nbytes:
            raise CheckpointError(
                f"{path}: tensor {key!r} shape {list(shape)} x {dtype_name} needs "
                f"{entry.numel * entry.dtype.itemsize} bytes but the header gives {entry.nbytes}"
            )
        entries[key] = entry
        spans.append((begin, end, key))
    spans.sort()
    for (_, end0, k0), (begin1, _, k1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{path}: tensors {k0!r} and {k1!r} overlap")
    return entries


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The shard files of a checkpoint directory, in index order; refuses pickles and stray paths."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map object)") from None
        root = model_dir.resolve()
        files = []
        for name in names:
            path = (model_dir / str(name)).resolve()
            if path.parent != root:
                raise CheckpointError(f"{index}: shard {name!r} points outside the model directory")
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {name!r} is missing")
            files.append(path)
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir}: only PyTorch pickle (.bin) weights found; they are never unpickled here. Convert once with "
            "transformers: PaliGemmaForConditionalGeneration.from_pretrained(dir).save_pretrained(out_dir)"
        )
    raise CheckpointError(f"{model_dir}: no *.safetensors weights found")


def read_checkpoint(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint directory, keyed by stored name, headers validated."""
    entries: dict[str, TensorEntry] = {}
    for path in checkpoint_files(model_dir):
        for key, entry in read_header(path).items():
            if key in entries:
                raise CheckpointError(f"{path}: tensor {key!r} is also stored in {entries[key].path.name}")
            entries[key] = entry
    return entries


# --- key names -------------------------------------------------------------------------------------------

LM_HEAD = "lm_head.weight"  # stored only by some writers; equals the embedding (tied)


def normalize_key(key: str) -> str:
    """Map any of the four writers' names (SPEC §2.3) onto our (Hub legacy) parameter names."""
    if key in ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight"):
        return LM_HEAD
    k = key.removeprefix("model.")
    for old, new in (
        ("vision_tower.vision_model.", "vision_tower.vision_model."),
        ("vision_tower.", "vision_tower.vision_model."),  # transformers 5.x drops `vision_model.`
        ("multi_modal_projector.linear.", "multi_modal_projector.linear."),
        ("multi_modal_projector.", "multi_modal_projector.linear."),
        ("language_model.model.", "language_model.model."),
        ("language_model.", "language_model.model."),  # transformers >= 4.52 in memory
    ):
        if k.startswith(old):
            return new + k[len(old) :]
    return key


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def match_entries(
    model: nn.Module, entries: dict[str, TensorEntry], key_map: Callable[[str], str | None] = normalize_key
) -> dict[str, TensorEntry]:
    """Parameter name -> checkpoint entry, every parameter exactly once, or a CheckpointError."""
    params = dict(model.named_parameters())
    plan: dict[str, TensorEntry] = {}
    unexpected, lm_head = [], None
    for key, entry in entries.items():
        name = key_map(key)
        if name == LM_HEAD:
            lm_head = entry
            continue
        if name is None or name not in params:
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
            got = list(entry.shape)
            raise CheckpointError(f"{entry.path}: {entry.key!r} has shape {got}, the model expects {want}")
    if lm_head is not None:  # a stored head must be the tied embedding's shape; its values are not used
        emb = next((n for n in params if n.endswith("embed_tokens.weight")), None)
        if emb is None or lm_head.shape != tuple(params[emb].shape):
            raise CheckpointError(f"{lm_head.path}: {lm_head.key!r} shape {list(lm_head.shape)} is not the embedding's")
    return plan


# --- materialise and stream ------------------------------------------------------------------------------


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Meta model -> uninitialised model on `device`: cast on meta first so pages are committed once."""
    model.to(dtype=dtype)  # on meta: changes the dtype, allocates nothing
    return model.to_empty(device=device)


def _pread_into(fd: int, out: torch.Tensor, offset: int, path: Path) -> None:
    """Fill the bytes of the contiguous CPU tensor `out` from `fd` at `offset` (short reads retried)."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: file ends at byte {offset + done}, inside a tensor (truncated?)")
        done += n


READ_WORKERS = 4  # reads in flight: a cold shard streams faster with several (docs/kernels.md, bench/kernels.py)


@dataclass(frozen=True)
class _Chunk:
    """One bounded read: `nbytes` at file `offset` into `dest` (a flat slice of a parameter)."""

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
    thread's reused staging buffer (source dtype) and `copy_` converts them into the final pages.
    (safetensors' `get_slice` was measured reading the whole tensor with the pread backend, and the mmap
    backend keeps touched pages resident while a shard is open; explicit reads have neither.)"""
    if chunk.dtype == chunk.dest.dtype and chunk.dest.device.type == "cpu":
        _pread_into(fd, chunk.dest, chunk.offset, path)
        return
    if not hasattr(local, "buffer"):
        local.buffer = torch.empty(chunk_bytes, dtype=torch.uint8)
    staged = local.buffer[: chunk.dest.numel() * chunk.dtype.itemsize].view(chunk.dtype)
    _pread_into(fd, staged, chunk.offset, path)
    with torch.no_grad():  # grad mode is per thread: this is a worker
        chunk.dest.copy_(staged)  # dtype conversion (and host-to-device copy) happens here


def _by_file(plan: dict[str, TensorEntry]) -> dict[Path, list[tuple[str, TensorEntry]]]:
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for name, entry in plan.items():
        by_file.setdefault(entry.path, []).append((name, entry))
    return by_file


def _progress_bar(plan: dict[str, TensorEntry], enabled: bool):
    from tqdm import tqdm

    total = sum(e.nbytes for e in plan.values())
    return tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not enabled, leave=False)


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
    thread owns one staging buffer of chunk_bytes / workers, so chunk_bytes bounds all temporaries.
    """
    params = dict(model.named_parameters())
    per_thread = max(1 << 20, chunk_bytes // workers)
    local = threading.local()
    with torch.no_grad(), _progress_bar(plan, progress) as bar, ThreadPoolExecutor(workers) as pool:
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
                    bar.update(chunk.dest.numel() * chunk.dtype.itemsize)
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
    wrong = sorted({str(e.dtype).removeprefix("torch.") for e in plan.values() if e.dtype != dtype})
    if wrong:
        want = str(dtype).removeprefix("torch.")
        raise CheckpointError(
            f"zero-copy needs a checkpoint stored in {want}, this one holds {', '.join(wrong)}; "
            "convert it once with `lowmem-paligemma convert` or load without zero-copy"
        )
    for path, items in _by_file(plan).items():
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, entry in items:
            view = torch.frombuffer(mapped, dtype=dtype, count=entry.numel, offset=entry.offset)
            _set_parameter(model, name, view.view(entry.shape))


# --- pre-flight ------------------------------------------------------------------------------------------

RUNTIME_MARGIN_BYTES = 300 << 20  # interpreter, torch, tokenizer, and the read chunk, roughly


class InsufficientMemoryError(CheckpointError):
    """The load would not fit in the memory available now."""


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
    plan: dict[str, TensorEntry], dtype: torch.dtype, device: torch.device | str, chunk_bytes: int
) -> None:
    need = load_bytes(plan, dtype) + chunk_bytes + RUNTIME_MARGIN_BYTES
    have = available_bytes(device)
    if need > have:
        where = torch.device(device).type
        advice = " or load in a 16-bit dtype" if dtype == torch.float32 else ""
        raise InsufficientMemoryError(
            f"loading needs about {need / 1e9:.2f} GB of {where} memory but {have / 1e9:.2f} GB is available; "
            f"close other programs{advice}, or force the load (--force / force=True)"
        )


# --- the PaliGemma entry points --------------------------------------------------------------------------


def stream_checkpoint(
    model: nn.Module,
    model_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    *,
    key_map: Callable[[str], str | None] = normalize_key,
    tie: Callable[[nn.Module], None] | None = None,
    repair: Callable[[nn.Module], None] | None = None,
    zero_copy: bool = False,
    preflight: bool = True,
    force: bool = False,
    progress: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_phase: Callable[[str], None] | None = None,
) -> nn.Module:
    """Fill any `nn.Module` built on `meta` from a safetensors checkpoint directory, at the memory floor.

    `key_map` maps a stored key to a parameter name (None: unexpected; `LM_HEAD`: a tied head to skip).
    `tie` re-ties shared parameters after materialisation (`to_empty` unties them); `repair` rebuilds
    non-persistent buffers, which `to_empty` leaves as garbage. Errors are raised before any allocation
    where the headers can tell (keys, shapes, memory), and nothing half-loaded is returned.
    """
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of float16, bfloat16, float32")
    if zero_copy and torch.device(device).type != "cpu":
        raise ValueError("zero-copy maps files into CPU memory; it cannot target another device")
    phase = on_phase or (lambda name: None)
    entries = read_checkpoint(Path(model_dir))
    plan = match_entries(model, entries, key_map)  # on meta: a mismatch costs nothing
    if preflight and not force and not zero_copy:
        check_memory(plan, dtype, device, chunk_bytes)
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


def load_model(
    model_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    **options,
) -> PaliGemmaForConditionalGeneration:
    """Stream a Hub-layout PaliGemma / PaliGemma 2 checkpoint into our model, in eval mode.

    Options are those of `stream_checkpoint` (zero_copy, preflight, force, progress, chunk_bytes, on_phase).
    """
    on_phase = options.get("on_phase") or (lambda name: None)
    on_phase("build")
    try:
        cfg = load_config(Path(model_path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    return stream_checkpoint(model, model_path, dtype, device, **options)


def load_hf_model(
    model_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16
):
    """(model, tokenizer) from a Hub checkpoint directory: the seed-000 API, streamed."""
    from .processor import load_tokenizer

    model = load_model(model_path, device=device, dtype=dtype)
    return model, load_tokenizer(model_path)


# --- transformers' own class through the same stream ----------------------------------------------------

_TO_TRANSFORMERS = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
)


def transformers_key(key: str) -> str | None:
    """Stored key -> transformers 5.x `PaliGemmaForConditionalGeneration` parameter name."""
    name = normalize_key(key)
    if name == LM_HEAD:
        return LM_HEAD
    for ours, theirs in _TO_TRANSFORMERS:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return None


def repair_transformers_buffers(model: nn.Module) -> None:
    """Rebuild the non-persistent buffers of a transformers model after `to_empty`, as its `_init_weights` does."""
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if name == "position_ids":  # (1, N) arange
                buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
            elif name in ("inv_freq", "original_inv_freq") and hasattr(module, "compute_default_rope_parameters"):
                if getattr(module, "rope_type", "default") != "default":
                    raise CheckpointError(f"cannot rebuild {module_name}.{name}: rope type {module.rope_type!r}")
                value, _ = module.compute_default_rope_parameters(module.config)  # as transformers' _init_weights
                buf.copy_(value)
            elif name == "embed_scale" and hasattr(module, "scalar_embed_scale"):
                buf.fill_(module.scalar_embed_scale)
            else:
                raise CheckpointError(f"do not know how to rebuild buffer {module_name}.{name}; pass repair=")


def load_transformers_model(
    model_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    attn_implementation: str | None = None,
    **options,
):
    """transformers' `PaliGemmaForConditionalGeneration`, filled by our stream instead of `from_pretrained`."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration as HFModel

    config = HFConfig.from_pretrained(model_path)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = HFModel(config)
    model.config.dtype = dtype

    def tie(m: nn.Module) -> None:
        m.lm_head.weight = m.model.language_model.embed_tokens.weight

    with torch.no_grad():
        return stream_checkpoint(
            model, model_path, dtype, device, key_map=transformers_key, tie=tie, repair=repair_transformers_buffers,
            **options,
        )  # fmt: skip
