"""The safetensors format and the Hub's sharded layout: reading, validating and writing, in one place.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (padded with spaces),
then the raw tensor bytes. The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin,
end]} relative to the start of the data; an optional "__metadata__" holds strings. A Hub checkpoint
directory holds one `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards and a
`model.safetensors.index.json` whose "weight_map" names each tensor's shard.

What is special here:
- Headers are read and checked without touching tensor data, so a bad checkpoint is refused before
  anything large is allocated; every error is one `CheckpointError` line naming the file.
- Tensor bytes are read with explicit positioned reads (`pread_into`), never a memory map: no
  file-backed RSS is left behind. (safetensors 0.8's `get_slice` with the pread backend was measured
  reading the whole tensor for any slice; its mmap backend keeps touched pages resident.)
- Writing streams: `write_sharded` takes each tensor as an iterator of row chunks, so a 2 GB
  embedding is never whole in memory. Shards are planned and named as transformers does.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' "5GB" at the time the Hub's PaliGemma shards were written
MAX_HEADER_BYTES = 100_000_000  # the reference implementation refuses larger headers
PARTIAL_SUFFIX = ".partial"  # a checkpoint directory still being written (convert.py); never loaded

# safetensors dtype names <-> torch dtypes.
DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
NAME_BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPE_BY_NAME.items()}
FLOAT_DTYPES = tuple(d for d in DTYPE_BY_NAME.values() if d.is_floating_point)  # what a quantizing fill reads
# The float dtypes a model can be loaded, converted or written in, by the names options use.
WEIGHT_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


# --- reading ---------------------------------------------------------------------------------------------


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
        return math.prod(self.shape)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of two equal keys silently; a header names each key once.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is a Python extension, not JSON")


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (true / false are not numbers here, 4.0 is not an integer)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_json(path: Path, raw: bytes) -> dict[str, object]:
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: header does not start with '{{' (not safetensors, or a wrong header length)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: header names {e.args[0]!r} twice") from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    return header


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors header without reading tensor data.

    The rules are the format's (huggingface/safetensors README.md, "Format") as the reference implementation
    enforces them (`safetensors/src/tensor.rs`: `read_metadata`, `Metadata::validate`):
    - an 8-byte little-endian length N, at most MAX_HEADER_BYTES and within the file;
    - N bytes of UTF-8 JSON, trailing whitespace allowed, no NaN / Infinity;
    - `__metadata__`, if present, maps strings to strings; every other key is a tensor with a known dtype,
      a shape of non-negative integers and `data_offsets` [begin, end] spanning shape x dtype size bytes;
    - sorted by begin, the tensors tile the data section exactly: the first begins at 0, each begins where
      the previous ends, the last ends at the end of the file. So a header length a few bytes off (the JSON
      still parses: it is padded with spaces) is refused instead of read one byte off.
    Stricter than safetensors 0.8 in three ways the README asks for or torch needs: the JSON must start with
    `{`, no key may appear twice ("Duplicate keys are disallowed"; json.loads would keep the last one
    silently), and dtypes outside DTYPE_BY_NAME are refused.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file too short for a safetensors header ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} is over the format's limit ({MAX_HEADER_BYTES})")
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    header = _parse_json(path, raw)
    metadata = header.pop("__metadata__", None)  # null is accepted, as the reference's Option<HashMap> does
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: __metadata__ is not a map of strings to strings")
    data_size = size - 8 - n
    entries, spans = {}, []
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(offsets, list) or len(offsets) != 2 or not isinstance(shape, list) or "dtype" not in info:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry")
        dtype_str, (begin, end) = info["dtype"], offsets
        if not isinstance(dtype_str, str) or dtype_str not in DTYPE_BY_NAME:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype_str!r}")
        if not all(_is_count(d) for d in shape) or not (_is_count(begin) and _is_count(end)) or end < begin:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed shape or offsets")
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {key!r} bytes [{begin}, {end}) lie outside the data ({data_size} bytes; truncated?)"
            )
        entry = TensorEntry(path, key, DTYPE_BY_NAME[dtype_str], tuple(shape), end - begin, 8 + n + begin)
        if entry.numel * entry.dtype.itemsize != entry.nbytes:
            raise CheckpointError(
                f"{path}: tensor {key!r} shape {shape} x {dtype_str} needs "
                f"{entry.numel * entry.dtype.itemsize} bytes but the header gives {entry.nbytes}"
            )
        entries[key] = entry
        spans.append((begin, end, key))
    _check_tiling(path, sorted(spans), data_size)
    return entries


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The sorted [begin, end) spans cover [0, data_size) exactly once (reference: `Metadata::validate`)."""
    at, previous = 0, None
    for begin, end, key in spans:
        if begin < at:
            raise CheckpointError(f"{path}: tensors {previous!r} and {key!r} overlap")
        if begin > at:
            after = f"after {previous!r}" if previous else "before the first tensor"
            raise CheckpointError(f"{path}: {begin - at} unaccounted bytes {after} (wrong offsets or header length)")
        at, previous = end, key
    if at != data_size:
        raise CheckpointError(
            f"{path}: the tensors end at data byte {at} but the file holds {data_size} data bytes "
            "(wrong header length, or bytes appended)"
        )


def read_index(model_dir: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor name -> shard file name), or None for a single-file checkpoint."""
    index = model_dir / INDEX_NAME
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"{index}: names {e.args[0]!r} twice") from None
    except (OSError, ValueError, RecursionError):
        raise CheckpointError(f"{index}: not valid JSON") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map of names to files)")
    return weight_map


def refuse_partial(model_dir: Path) -> None:
    """A directory still being written, or left by a writer that was killed, is never a checkpoint."""
    if model_dir.name.endswith(PARTIAL_SUFFIX):
        raise CheckpointError(f"{model_dir}: the unfinished output of a `convert`; delete it and convert again")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The shard files of a checkpoint directory, in index order; refuses pickles and stray paths."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    refuse_partial(model_dir)
    weight_map = read_index(model_dir)
    if weight_map is not None:
        index, files = model_dir / INDEX_NAME, []
        for name in dict.fromkeys(weight_map.values()):
            # A bare file name: the index cannot reach elsewhere. (The file may be a link, as in a Hub cache
            # snapshot, where every file links to ../../blobs/<sha256>.)
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard {name!r} points outside the model directory")
            path = model_dir / name
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
    """Every tensor of a checkpoint directory, keyed by stored name, headers validated.

    With an index, its weight_map must say where every stored tensor is, and nothing else: an index that
    disagrees with the shards is a sign of a mixed or corrupted download.
    """
    entries: dict[str, TensorEntry] = {}
    for path in checkpoint_files(model_dir):
        for key, entry in read_header(path).items():
            if key in entries:
                raise CheckpointError(f"{path}: tensor {key!r} is also stored in {entries[key].path.name}")
            entries[key] = entry
    weight_map = read_index(model_dir) or {}
    index = model_dir / INDEX_NAME
    for key, name in weight_map.items():
        if key not in entries:
            raise CheckpointError(f"{index}: weight_map lists {key!r}, which no shard holds")
        if entries[key].path != model_dir / name:
            raise CheckpointError(f"{index}: weight_map puts {key!r} in {name!r}, which does not hold it")
    if weight_map and len(weight_map) != len(entries):
        key = next(k for k in entries if k not in weight_map)
        raise CheckpointError(f"{index}: the weight_map does not list {key!r}, which a shard holds")
    return entries


def pread_into(fd: int, out: torch.Tensor, offset: int, path: Path) -> None:
    """Fill the bytes of the contiguous CPU tensor `out` from `fd` at `offset`; short reads are retried
    (a read may return less than asked: signals, requests over 2 GB)."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: file ends at byte {offset + done}, inside a tensor (truncated?)")
        done += n


def read_rows(entry: TensorEntry, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """The tensor's rows (dim 0) in its stored dtype, at most max(chunk_bytes, one row) bytes at a time.

    Each chunk is a view of one reused buffer: consume it before taking the next.
    """
    if entry.nbytes == 0:
        return
    n = entry.shape[0] if entry.shape else 1  # a 0-d tensor is one row
    row_bytes = entry.nbytes // n
    rows = max(1, min(n, chunk_bytes // row_bytes))
    buf = torch.empty(rows * row_bytes, dtype=torch.uint8)
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        for r0 in range(0, n, rows):
            k = min(rows, n - r0)
            view = buf[: k * row_bytes]
            pread_into(fd, view, entry.offset + r0 * row_bytes, entry.path)
            yield view.view(entry.dtype).reshape(k, *entry.shape[1:]) if entry.shape else view.view(entry.dtype)
    finally:
        os.close(fd)


# --- writing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, stored dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards, as huggingface_hub's `split_state_dict_into_shards_factory` groups them: in
    order; a tensor that would tip the current shard over the limit starts a new one; a tensor bigger than the
    limit gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes.items():
        if size > max_shard_bytes:
            shards.append([name])
            continue
        if current and current_size + size > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    """transformers' file names for n shards."""
    return [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def header_bytes(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """8-byte little-endian length + JSON header, padded with spaces so the data starts 8-byte aligned."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        end = offset + spec.nbytes
        header[spec.name] = {
            "dtype": NAME_BY_DTYPE[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_sharded(
    out_dir: Path,
    specs: list[TensorSpec],
    chunks: Callable[[TensorSpec], Iterator[torch.Tensor]],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Write `specs` (in this order) as shards + index into `out_dir`; returns the weight map (name -> file).

    `chunks(spec)` yields the tensor's rows in order, in any dtype (converted to `spec.dtype` here, rounding
    to nearest even as `copy_` into a parameter does). `progress(bytes_done, bytes_total)` after each tensor.
    Stale shards of an earlier checkpoint in `out_dir` are removed first: a loader might read them.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    by_name = {s.name: s for s in specs}
    plan = shard_plan({s.name: s.nbytes for s in specs}, max_shard_bytes)
    total, done = sum(s.nbytes for s in specs), 0
    weight_map: dict[str, str] = {}
    for fname, names in zip(shard_names(len(plan)), plan, strict=True):
        shard = [by_name[n] for n in names]
        with open(out_dir / fname, "wb") as f:
            f.write(header_bytes(shard))
            for spec in shard:
                written = 0
                for x in chunks(spec):
                    data = x.to(spec.dtype).contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
                    f.write(data.view(torch.uint8).numpy().data)  # little-endian, as on every torch host
                    written += data.numel() * spec.dtype.itemsize
                if written != spec.nbytes:
                    raise AssertionError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")
                done += spec.nbytes
                if progress is not None:
                    progress(done, total)
        weight_map |= dict.fromkeys(names, fname)
    if len(plan) > 1:
        n_params = sum(math.prod(s.shape) for s in specs)
        index = {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map
