"""Rewrite a safetensors checkpoint in another float dtype (e.g. the Hub's fp32 PaliGemma as bf16), in low RAM.

What is special:
- Same memory discipline as the loader: every header is read and validated first (`read_checkpoint`), then each
  tensor is read in row chunks of at most `chunk_bytes` with positioned reads into one buffer (`read_rows`: no
  mmap, so no file-backed RSS), converted, and appended to the output shard (`write_sharded`). A 2.1 GB fp32
  embedding never exists whole: the RAM beyond the interpreter is one source chunk plus its converted copy.
- A faithful copy: keys keep their original names (whatever writer produced them), float tensors change dtype,
  anything else (int, bool) is copied byte for byte. Shards are re-planned for the new sizes with transformers'
  rule and names (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`; one `model.safetensors`
  when everything fits in one shard), so the result is a Hub-layout directory any loader reads.
- The non-weight files come along: config.json with its dtype fields set to the new dtype, and the generation,
  preprocessor, tokenizer and processor files (every top-level file that is not weights and not hidden).
- All or nothing: the output is written into a hidden temporary directory beside `dst_dir` and renamed into
  place at the end; any failure (or Ctrl-C) removes it. A process killed outright (SIGKILL) leaves it behind:
  the loader refuses it by its `.partial` suffix, and the next convert into `dst_dir` removes it.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import CheckpointError, OutputError
from .loader import DEFAULT_CHUNK_BYTES
from .safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    PARTIAL_SUFFIX,
    WEIGHT_DTYPES,
    TensorSpec,
    dtype_name,
    read_checkpoint,
    read_rows,
    write_sharded,
)
from .units import format_bytes

# Other weight formats are never copied: a stale pickle next to the converted shards would be a second model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx")


def convert_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `src_dir`'s checkpoint to a new directory `dst_dir` with every float tensor in `dtype`.

    `progress(bytes_written, bytes_total)` is called after each tensor. Raises CheckpointError for a bad source,
    OutputError for a destination that exists and is not empty (or is the source, or does not fit on the disk),
    and ValueError for bad arguments.
    """
    if dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"dtype {dtype} is not one of {', '.join(WEIGHT_DTYPES)}")
    if max_shard_bytes <= 0 or chunk_bytes <= 0:
        raise ValueError(f"max_shard_bytes and chunk_bytes must be positive, got {max_shard_bytes}, {chunk_bytes}")
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if dst.resolve() == src.resolve():
        raise OutputError(f"{dst}: the destination is the source directory; convert into a new directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise OutputError(f"{dst}: destination exists and is not empty; remove it or choose another directory")

    entries = read_checkpoint(src)  # every header validated before a byte is written
    # Stable sort by item size, largest first (the safetensors writer's rule): a 1-byte tensor of odd length
    # never leaves a wider tensor unaligned in the file. For an all-float checkpoint this is the source order.
    specs = [TensorSpec(key, dtype if e.dtype.is_floating_point else e.dtype, e.shape) for key, e in entries.items()]
    specs.sort(key=lambda s: -s.dtype.itemsize)
    total = sum(s.nbytes for s in specs)

    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < total:
        raise OutputError(f"{dst.parent}: {format_bytes(free)} free, the converted weights need {format_bytes(total)}")

    _remove_abandoned(dst)
    # Not tempfile.mkdtemp: its 0700 mode would become the converted checkpoint's. The suffix keeps the loader
    # away from it: a directory that looks complete but was never renamed is refused (safetensors_io.py).
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    tmp.mkdir()
    try:
        # Same rounding as the loader's copy_ into a parameter of `dtype` (round to nearest even), so loading the
        # converted file gives bit-identical weights to loading the source into that dtype.
        write_sharded(tmp, specs, lambda spec: read_rows(entries[spec.name], chunk_bytes), max_shard_bytes, progress)
        _copy_side_files(src, tmp, dtype)
        # rename(2) replaces an empty directory atomically, so an empty dst (e.g. made by the caller) is fine.
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _remove_abandoned(dst: Path) -> None:
    """Temporary directories of earlier converts into `dst` whose process is gone: SIGKILL (or a power cut)
    runs no cleanup. One whose process still runs is another convert at work, and is left alone."""
    for partial in dst.parent.glob(f".{glob.escape(dst.name)}.*{PARTIAL_SUFFIX}"):
        pid = partial.name[len(dst.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


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
    name = dtype_name(dtype)
    out = dict(config, torch_dtype=name)
    if "dtype" in out:
        out["dtype"] = name
    for key, value in out.items():
        if key.endswith("_config") and isinstance(value, dict):
            out[key] = {k: name if k in ("torch_dtype", "dtype") else v for k, v in value.items()}
    return out
