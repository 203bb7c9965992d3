"""Checksums of a checkpoint's shards against sums the user already has: the one check for corrupted tensor bytes.

Header validation (safetensors_io.py) proves a shard is well formed; a flipped bit inside a weight is still a
valid number, so only a checksum from elsewhere can catch it (docs/reliability.md). Where the expected sums come
from, for each shard, in this order:
- a sums file the user names, in `sha256sum` format: "<64 hex digits>  <file name>" per line ("*" before the
  name and "./" or directories in it are fine: names are matched by their last part);
- the Hub's download metadata: `huggingface-cli download REPO --local-dir DIR` writes
  DIR/.cache/huggingface/download/<file>.metadata, three lines: commit hash, etag, timestamp. The etag of an
  LFS file (every shard) is its sha256; of a small file, its git blob sha1 (huggingface_hub, `_local_folder.py`);
- a Hub cache snapshot (.../models--ORG--NAME/snapshots/<commit>/): each file links to blobs/<etag>.
Verifying reads every byte once (about as long as copying the checkpoint); the load then reads them again.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..errors import CheckpointError
from .safetensors_io import checkpoint_files

HUB_METADATA_DIR = Path(".cache") / "huggingface" / "download"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
_SUMS_LINE = re.compile(r"(?P<hex>[0-9a-fA-F]{64}) [ *](?P<name>.+)")
_READ_BYTES = 8 << 20


def read_sums(path: Path) -> dict[str, str]:
    """File name (last part) -> sha256 from a `sha256sum`-format file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the sums file ({e})") from None
    sums: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _SUMS_LINE.fullmatch(line.rstrip())
        if m is None:
            raise CheckpointError(f"{path}: line {i} is not '<sha256>  <file name>'")
        name, digest = Path(m["name"]).name, m["hex"].lower()
        if sums.setdefault(name, digest) != digest:
            raise CheckpointError(f"{path}: two different sums for {name}")
    return sums


def _hub_etag(model_dir: Path, name: str) -> str | None:
    """The etag huggingface_hub recorded for `name`: from its local-dir metadata, or a cache snapshot's link."""
    metadata = model_dir / HUB_METADATA_DIR / f"{name}.metadata"
    if metadata.is_file():
        lines = metadata.read_text(encoding="utf-8", errors="replace").splitlines()
        return lines[1].strip().lower() if len(lines) > 1 else None
    target = (model_dir / name).resolve()
    if (model_dir / name).is_symlink() and target.parent.name == "blobs":
        return target.name.lower()
    return None


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, read in bounded chunks."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha256.update(view[:n])
            sha1.update(view[:n])
    return sha256.hexdigest(), sha1.hexdigest()


def verify_checkpoint(model_dir: str | os.PathLike, sums: str | os.PathLike | None = None) -> list[Path]:
    """Check every shard of `model_dir` against `sums` (a sums file) or, without one, the Hub's records.

    Returns the shards checked; a shard that differs, or has no sum to compare with, is a CheckpointError
    naming it.
    """
    model_dir = Path(model_dir)
    # The layout is checked first (missing shards, pickles, paths outside the directory); index order.
    names = [p.name for p in checkpoint_files(model_dir)]
    known = read_sums(Path(sums)) if sums is not None else {}
    source = str(sums) if sums is not None else "the Hub's download records"
    shards = []
    for name in names:
        shard = model_dir / name
        want = known.get(Path(name).name) if sums is not None else _hub_etag(model_dir, name)
        if want is None and sums is not None:
            raise CheckpointError(f"{shard}: {sums} holds no sha256 for {Path(name).name}")
        if want is None:
            raise CheckpointError(
                f"{shard}: no checksum to compare with: no {HUB_METADATA_DIR / name}.metadata (huggingface-cli "
                "download --local-dir writes it) and not a Hub cache link; pass a sums file instead"
            )
        if not (_SHA256.fullmatch(want) or _GIT_SHA1.fullmatch(want)):
            raise CheckpointError(f"{shard}: the recorded etag {want!r} is not a sha256 or a git sha1")
        sha256, sha1 = file_digests(shard)
        got = sha256 if len(want) == 64 else sha1
        if got != want:
            raise CheckpointError(
                f"{shard}: checksum {got[:16]}... differs from {want[:16]}... in {source}; the file is corrupted "
                "or from another revision: download it again"
            )
        shards.append(shard)
    return shards
