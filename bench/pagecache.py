"""The page cache around a benchmark: start cold or warm, measure the disk, see what stayed cached."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from lowmem_paligemma.checkpoint.safetensors_io import checkpoint_files


def set_page_cache(path: Path, cache: str) -> None:
    """cold: drop the shards' clean pages (posix_fadvise DONTNEED, no root needed); warm: read each shard once."""
    for shard in checkpoint_files(path):
        if cache == "cold":
            fd = os.open(shard, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
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
    """Share of the checkpoint's bytes in the page cache now (util-linux `fincore`; None without it)."""
    if shutil.which("fincore") is None:
        return None
    files = [str(s) for s in checkpoint_files(path)]
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *files], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    res = size = 0
    for line in out.stdout.splitlines():
        r, s = line.split()
        res, size = res + int(r), size + int(s)
    return res / size if size else None
