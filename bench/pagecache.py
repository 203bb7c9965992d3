"""The page cache around a benchmark: start cold or warm, measure the disk, see what stayed cached."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lowmem_paligemma.checkpoint.pagecache import drop_file, resident_total
from lowmem_paligemma.checkpoint.safetensors_io import checkpoint_files


def set_page_cache(path: Path, cache: str) -> None:
    """cold: drop the shards' clean pages (posix_fadvise DONTNEED, no root needed); warm: read each shard once."""
    for shard in checkpoint_files(path):
        if cache == "cold":
            drop_file(shard)
        else:
            buf = bytearray(1 << 20)
            with open(shard, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def disk_read_speed(path: Path, nbytes: int = 2_000_000_000) -> float:
    """Cold sequential read speed (bytes/s) of the checkpoint's disk, 1 MB reads: virtual disks drift."""
    shard = max(checkpoint_files(path), key=lambda f: f.stat().st_size)
    buf, done = bytearray(1 << 20), 0
    with open(shard, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        while done < nbytes and (n := f.readinto(buf)):
            done += n
        seconds = time.perf_counter() - t0
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return done / seconds


def cached_fraction(path: Path) -> float | None:
    """Share of the checkpoint's bytes in the page cache now (mincore, checkpoint/pagecache.py; None without it)."""
    files = checkpoint_files(path)
    size = sum(f.stat().st_size for f in files)
    cached = resident_total(files)
    return None if cached is None or not size else cached / size
