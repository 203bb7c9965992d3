"""Streaming low-RAM loader: meta build -> cast on meta -> to_empty -> fill shard by shard, chunk by chunk.

How a tensor travels (docs/architecture.md has the picture):
1. Every shard header is read and checked before anything is allocated (`read_header`): the loader
   knows each tensor's file, dtype, shape and byte range, and refuses a bad checkpoint up front.
2. The model is built on `meta` (zero bytes), cast to the target dtype *on meta* (casting after
   `to_empty` would commit every page twice), then `to_empty` allocates it once, uninitialised.
3. Checkpoint keys are normalised (the four writers' prefixes, SPEC §2.3) and matched 1:1 against
   the parameters: missing, unexpected and wrong-shape keys are one readable error, before any read.
4. Shards are opened one at a time with safetensors' `pread` backend (no mmap: no file-backed RSS
   residue) and each tensor is copied into its parameter in row chunks of at most `chunk_bytes`, so
   a float32 embedding (2.1 GB) never exists whole; the dtype conversion happens inside `copy_`.
5. Buffers: our model has none (rope tables and positions are computed on the fly); a module that
   has some gets them rebuilt by the caller's `repair` hook after materialisation.
The output head is the embedding table itself, so tying cannot be lost.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import ConfigError, PaliGemmaConfig, load_config
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
        entry = TensorEntry(path, key, _ST_DTYPES[dtype_name], shape, end - begin)
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
        if tuple(params[name].shape) != entry.shape:
            raise CheckpointError(
                f"{entry.path}: {entry.key!r} has shape {list(entry.shape)}, the model expects {list(params[name].shape)}"
            )
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


def _copy_entry(f, entry: TensorEntry, dest: torch.Tensor, chunk_bytes: int) -> None:
    """Copy one tensor into `dest` in row chunks of at most chunk_bytes (source dtype)."""
    view = f.get_slice(entry.key)
    if len(entry.shape) == 0:
        dest.copy_(view[...])
        return
    row_bytes = max(1, entry.nbytes // max(1, entry.shape[0]))
    rows = max(1, chunk_bytes // row_bytes)
    n = entry.shape[0]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)  # safetensors refuses slices past the end
        chunk = view[r0:r1]  # pread of these rows only
        dest[r0:r1].copy_(chunk)  # dtype conversion happens here, into the final pages
        del chunk


def stream_into(
    model: nn.Module,
    plan: dict[str, TensorEntry],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_shard: Callable[[int, int, Path], None] | None = None,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> None:
    """Fill every planned parameter in place, one shard open at a time."""
    params = dict(model.named_parameters())
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for name, entry in plan.items():
        by_file.setdefault(entry.path, []).append((name, entry))
    with torch.no_grad():
        for i, (path, items) in enumerate(by_file.items(), 1):
            if on_shard:
                on_shard(i, len(by_file), path)
            try:
                with safe_open(path, framework="pt", device="cpu", backend="pread") as f:
                    for name, entry in items:
                        _copy_entry(f, entry, params[name], chunk_bytes)
                        if on_tensor:
                            on_tensor(entry)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types; name the file on one line
                raise CheckpointError(f"{path}: read failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def build_model(cfg: PaliGemmaConfig, dtype: torch.dtype = torch.float16, device: str = "cpu") -> nn.Module:
    """An uninitialised PaliGemma of `cfg` in `dtype` on `device` (the meta build + materialise steps)."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    return materialize(model, dtype, device)


def load_model(
    model_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_shard: Callable[[int, int, Path], None] | None = None,
) -> PaliGemmaForConditionalGeneration:
    """Stream a Hub-layout PaliGemma / PaliGemma 2 checkpoint into our model, in eval mode."""
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of float16, bfloat16, float32")
    model_dir = Path(model_path)
    try:
        cfg = load_config(model_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    entries = read_checkpoint(model_dir)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    plan = match_entries(model, entries)  # on meta: a mismatch costs nothing
    materialize(model, dtype, device)
    stream_into(model, plan, chunk_bytes, on_shard=on_shard)
    return model.eval()


def load_hf_model(model_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16):
    """(model, tokenizer) from a Hub checkpoint directory: the seed-000 API, streamed."""
    from .processor import load_tokenizer

    model = load_model(model_path, device=device, dtype=dtype)
    return model, load_tokenizer(model_path)
