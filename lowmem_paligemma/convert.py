"""Rewrite a safetensors checkpoint in another float dtype (e.g. the Hub's fp32 PaliGemma as bf16), in low RAM.

What is special:
- Same memory discipline as the loader: every header is read and validated first (`read_checkpoint`), then each
  tensor is read in row chunks of at most `chunk_bytes` with plain positioned reads into one buffer (no mmap, so
  no file-backed RSS; not safetensors' `get_slice`, see `_read_chunks`), converted, and appended to the output
  shard. A 2.1 GB fp32 embedding never exists whole: the RAM beyond the interpreter is one source chunk plus its
  converted copy.
- A faithful copy: keys keep their original names (whatever writer produced them), float tensors change dtype,
  anything else (int, bool) is copied byte for byte. Shards are re-planned for the new sizes with transformers'
  rule and names (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`; one `model.safetensors`
  when everything fits in one shard), so the result is a Hub-layout directory any loader reads.
- The non-weight files come along: config.json with its dtype fields set to the new dtype, and the generation,
  preprocessor, tokenizer and processor files (every top-level file that is not weights and not hidden).
- All or nothing: the output is written into a hidden temporary directory beside `dst_dir` and renamed into
  place at the end; any failure (or Ctrl-C) removes it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from .loader import DEFAULT_CHUNK_BYTES, CheckpointError, TensorEntry, read_checkpoint
from .synth import safetensors_header, shard_plan

CONVERT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' "5GB" default, as on the Hub
INDEX_NAME = "model.safetensors.index.json"
# Other weight formats are never copied: a stale pickle next to the converted shards would be a second model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx")

_ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def convert_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `src_dir`'s checkpoint to a new directory `dst_dir` with every float tensor in `dtype`.

    `progress(bytes_written, bytes_total)` is called after each tensor. Raises CheckpointError for a bad source
    and ValueError for bad arguments or a destination that exists and is not empty.
    """
    if dtype not in CONVERT_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of bfloat16, float16, float32")
    if max_shard_bytes <= 0 or chunk_bytes <= 0:
        raise ValueError(f"max_shard_bytes and chunk_bytes must be positive, got {max_shard_bytes}, {chunk_bytes}")
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the destination is the source directory; convert into a new directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst}: destination exists and is not empty; remove it or choose another directory")

    entries = read_checkpoint(src)  # every header validated before a byte is written
    out_dtype = {key: dtype if e.dtype.is_floating_point else e.dtype for key, e in entries.items()}
    # Stable sort by item size, largest first (the safetensors writer's rule): a 1-byte tensor of odd length
    # never leaves a wider tensor unaligned in the file. For an all-float checkpoint this is the source order.
    keys = sorted(entries, key=lambda k: -out_dtype[k].itemsize)
    sizes = {k: entries[k].numel * out_dtype[k].itemsize for k in keys}
    total = sum(sizes.values())

    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < total:
        raise ValueError(f"{dst.parent}: {free / 1e9:.2f} GB free, the converted weights need {total / 1e9:.2f} GB")

    # Not tempfile.mkdtemp: its 0700 mode would become the converted checkpoint's.
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    try:
        shards = shard_plan(sizes, max_shard_bytes)
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        done = 0
        for name, shard_keys in zip(names, shards, strict=True):
            header = safetensors_header([(k, _ST_NAMES[out_dtype[k]], entries[k].shape, sizes[k]) for k in shard_keys])
            with open(tmp / name, "wb") as out:
                out.write(header)
                for key in shard_keys:
                    entry = entries[key]
                    for chunk in _read_chunks(entry, chunk_bytes):
                        _write(out, chunk, out_dtype[key])
                    done += sizes[key]
                    if progress is not None:
                        progress(done, total)
        if len(shards) > 1:
            weight_map = {k: name for name, shard_keys in zip(names, shards, strict=True) for k in shard_keys}
            n_params = sum(e.numel for e in entries.values())
            index = {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _copy_side_files(src, tmp, dtype)
        # rename(2) replaces an empty directory atomically, so an empty dst (e.g. made by the caller) is fine.
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _read_chunks(entry: TensorEntry, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """The tensor's rows (dim 0) in source dtype, at most max(chunk_bytes, one row) bytes at a time."""
    # Plain reads at the tensor's offset into one reused buffer. Not safetensors' get_slice: with the pread
    # backend (0.8.0) every slice reads the *whole* tensor into a temporary first (measured: +268 MB peak for a
    # 1-row slice of a 268 MB tensor), and with mmap the touched pages stay resident as file-backed RSS until
    # the file is closed.
    n = entry.shape[0] if entry.shape else 1  # a 0-d tensor is one row
    if entry.nbytes == 0:
        return
    row_bytes = entry.nbytes // n
    rows = max(1, min(n, chunk_bytes // row_bytes))
    buf = torch.empty(rows * row_bytes, dtype=torch.uint8)
    with open(entry.path, "rb", buffering=0) as f:
        for r0 in range(0, n, rows):
            k = min(rows, n - r0)
            view = buf[: k * row_bytes]
            f.seek(entry.offset + r0 * row_bytes)
            got = f.readinto(view.numpy())
            while got < view.numel():  # a read may return less than asked (signals, >2 GB requests)
                more = f.readinto(view[got:].numpy())
                if not more:
                    raise CheckpointError(f"{entry.path}: {entry.key!r} ends early (file changed while converting?)")
                got += more
            yield view.view(entry.dtype).reshape(k, *entry.shape[1:]) if entry.shape else view.view(entry.dtype)


def _write(out: BinaryIO, chunk: torch.Tensor, dtype: torch.dtype) -> None:
    # Same rounding as the loader's copy_ into a parameter of `dtype` (round to nearest even), so loading the
    # converted file gives bit-identical weights to loading the source into that dtype.
    data = chunk.to(dtype).contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
    out.write(data.view(torch.uint8).numpy().data)  # safetensors data is little-endian, as is every torch host


def _copy_side_files(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Config (dtype updated), generation, preprocessor, tokenizer and processor files; weights and dotfiles not."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name == INDEX_NAME or f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if f.name == "config.json":
            (dst / f.name).write_text(json.dumps(_with_dtype(json.loads(f.read_text()), dtype), indent=2) + "\n")
        else:
            shutil.copy2(f, dst / f.name)


def _with_dtype(config: dict, dtype: torch.dtype) -> dict:
    # transformers 4.x writes `torch_dtype`, 5.x `dtype`; sub-configs may carry their own. Set the top level
    # always and every existing one, so no field still claims the old precision.
    name = str(dtype).removeprefix("torch.")
    out = dict(config, torch_dtype=name)
    if "dtype" in out:
        out["dtype"] = name
    for key, value in out.items():
        if key.endswith("_config") and isinstance(value, dict):
            out[key] = {k: name if k in ("torch_dtype", "dtype") else v for k, v in value.items()}
    return out
