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
- `quantize` "int8" / "int4" writes a pre-quantized checkpoint in compressed-tensors' layout (formats/compressed.py):
  the layers the loader would quantize (build.quantize_layers, on the meta model) are quantized by each format's
  own arithmetic, so loading the result equals quantizing at load bit for bit when the source is
  stored in the load dtype. The tied embedding stays dense (transformers cannot load it quantized, see
  docs/quantization.md) and the loader quantizes it while streaming. The chunks bound the quantizing
  temporaries as the loader's fills do. Each stored tensor is computed in a pass of its own over the source
  rows (a layer's scales and values lie apart in the file), so a quantized layer's source is read twice and
  nothing of it waits in memory.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import defaults
from ..checkpoint.loader import FILL_BYTES_PER_ELEMENT
from ..checkpoint.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    PARTIAL_SUFFIX,
    WEIGHT_DTYPES,
    TensorEntry,
    TensorSpec,
    dtype_name,
    read_checkpoint,
    read_rows,
    write_sharded,
)
from ..errors import CheckpointError, OptionError, OutputError
from ..formats import registry
from ..formats.base import WeightFormat
from ..formats.compressed import quantization_config
from ..units import format_bytes, parse_size
from .build import build_model, stored_format
from .keys import normalize_key

# Other weight formats are never copied: a stale pickle next to the converted shards would be a second model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx")


def convert_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    chunk_bytes: int = defaults.CHUNK_BYTES,
    progress: Callable[[int, int], None] | None = None,
    quantize: str | None = None,
) -> Path:
    """Write `src_dir`'s checkpoint to a new directory `dst_dir` with every float tensor in `dtype`, and with
    the towers' linear layers quantized (compressed-tensors' layout) if `quantize` names a quantizing format
    that has a compressed-tensors scheme (int8, int4).

    `max_shard_bytes` takes a size such as "2GB". `progress(bytes_written, bytes_total)` is called after each
    tensor. Raises CheckpointError for a bad source, OutputError for a destination that exists and is not empty
    (or is the source, or does not fit on the disk), and OptionError (a ValueError) for bad arguments.
    """
    dtype = WEIGHT_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype  # "bfloat16" as load_model takes it
    if dtype not in WEIGHT_DTYPES.values():
        raise OptionError(f"dtype {dtype} is not one of {', '.join(WEIGHT_DTYPES)}", "dtype")
    storable = [m for m in registry.quantize_modes() if registry.get(m).compressed is not None]
    if quantize is not None and quantize not in storable:
        raise OptionError(f"quantize must be one of {', '.join(storable)}, got {quantize!r}", "quantize")
    if isinstance(max_shard_bytes, str):
        try:
            max_shard_bytes = parse_size(max_shard_bytes)
        except ValueError as e:
            raise OptionError(str(e), "max_shard_bytes") from None
    if max_shard_bytes <= 0 or chunk_bytes <= 0:
        raise OptionError(f"max_shard_bytes and chunk_bytes must be positive, got {max_shard_bytes}, {chunk_bytes}")
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if dst.resolve() == src.resolve():
        raise OutputError(f"{dst}: the destination is the source directory; convert into a new directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise OutputError(f"{dst}: destination exists and is not empty; remove it or choose another directory")

    entries = read_checkpoint(src)  # every header validated before a byte is written
    if quantize is None:
        specs = [TensorSpec(key, _stored_dtype(e, dtype), e.shape) for key, e in entries.items()]
        sources = {key: partial(read_rows, e, chunk_bytes) for key, e in entries.items()}
        quantization = None
    else:
        specs, sources, quantization = _quantized_plan(src, entries, dtype, quantize, chunk_bytes)
    # Stable sort by item size, largest first (the safetensors writer's rule): a 1-byte tensor of odd length
    # never leaves a wider tensor unaligned in the file. For an all-float checkpoint this is the source order.
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
        write_sharded(tmp, specs, lambda spec: sources[spec.name](), max_shard_bytes, progress)
        _copy_side_files(src, tmp, dtype, quantization)
        # rename(2) replaces an empty directory atomically, so an empty dst (e.g. made by the caller) is fine.
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _remove_abandoned(dst: Path) -> None:
    """Temporary directories of earlier converts into `dst` whose process is gone: SIGKILL (or a power cut)
    runs no cleanup. One whose process still runs is another convert at work, and is left alone."""
    for leftover in dst.parent.glob(f".{glob.escape(dst.name)}.*{PARTIAL_SUFFIX}"):
        pid = leftover.name[len(dst.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def _stored_dtype(entry: TensorEntry, dtype: torch.dtype) -> torch.dtype:
    return dtype if entry.dtype.is_floating_point else entry.dtype


def _quantized_plan(
    src: Path, entries: dict[str, TensorEntry], dtype: torch.dtype, mode: str, chunk_bytes: int
) -> tuple[list[TensorSpec], dict[str, Callable[[], Iterator[torch.Tensor]]], dict[str, Any]]:
    """The tensors to write (each with its row source) and config.json's quantization_config."""
    if stored_format(src) is not None:
        raise CheckpointError(f"{src}: already stored quantized; convert the original checkpoint instead")
    model, _ = build_model(src, mode)  # on meta: the loader's policy, zero bytes
    modules = dict(model.named_modules())
    specs, sources, layers = [], {}, {}
    for key, entry in entries.items():
        name, _, leaf = normalize_key(key).rpartition(".")
        module = modules.get(name) if leaf == "weight" else None
        fmt = registry.of(module) if module is not None else None
        if fmt is None or fmt.compressed is None or hasattr(module, "lookup"):  # dense, or the tied embedding
            specs.append(TensorSpec(key, _stored_dtype(entry, dtype), entry.shape))
            sources[key] = partial(read_rows, entry, chunk_bytes)
            continue
        if not entry.dtype.is_floating_point or entry.shape != (module.out_features, module.in_features):
            raise CheckpointError(
                f"{entry.path}: {key!r} ({dtype_name(entry.dtype)} {list(entry.shape)}) is not a float weight of "
                f"shape {[module.out_features, module.in_features]} to quantize"
            )
        layers[name] = fmt.name
        stem = key.removesuffix("weight")
        # Source bytes per read whose quantizing temporaries (float32 copies, codes) stay within chunk_bytes.
        read_bytes = max(1, chunk_bytes * entry.dtype.itemsize // FILL_BYTES_PER_ELEMENT)
        constants = fmt.stored_constants(module.out_features, module.in_features)
        for leaf, (leaf_dtype, shape) in fmt.stored_tensors(module.out_features, module.in_features, dtype).items():
            specs.append(TensorSpec(stem + leaf, leaf_dtype, shape))
            if leaf in constants:
                sources[stem + leaf] = partial(iter, [constants[leaf]])
            else:
                sources[stem + leaf] = partial(_quantized_rows, entry, fmt, leaf, dtype, read_bytes)
    return specs, sources, quantization_config(layers)


def _quantized_rows(
    entry: TensorEntry, fmt: WeightFormat, leaf: str, dtype: torch.dtype, read_bytes: int
) -> Iterator[torch.Tensor]:
    """The rows of the stored tensor `leaf` of a layer quantized from `entry` into `fmt`."""
    for rows in read_rows(entry, read_bytes):
        yield fmt.stored_rows(rows, leaf, dtype)


def _copy_side_files(src: Path, dst: Path, dtype: torch.dtype, quantization: dict[str, Any] | None) -> None:
    """Config (dtype and quantization_config updated), generation, preprocessor, tokenizer and processor files;
    weights and dotfiles not."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name == INDEX_NAME or f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if f.name == "config.json":
            config = _with_dtype(json.loads(f.read_text()), dtype)
            if quantization is not None:
                config["quantization_config"] = quantization
            (dst / f.name).write_text(json.dumps(config, indent=2) + "\n")
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
