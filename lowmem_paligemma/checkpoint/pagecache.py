"""The page cache: how much of a file sits in it, dropping it, and reading past it.

The page cache is not part of any process's RSS, yet on a small machine it is the same RAM: a runtime
that streams a 17 GB checkpoint through buffered reads fills it, and evicting it costs the other programs
their own cache. streamer.py reads streamed layers with O_DIRECT (`open_direct`, `read_direct`: the bytes go
from the disk into the layer buffer and never enter the cache), or where a filesystem refuses O_DIRECT with
buffered reads whose pages it drops at once (`drop`); `resident_bytes` checks that nothing stayed.
O_DIRECT wants the file offset, the length and the memory address aligned to the device's logical block
(512 or 4096 bytes); DIRECT_ALIGN covers both. docs/streaming.md has the measurements behind the choice.

`resident_bytes` asks the kernel with mincore(2) over a fresh read-only shared mapping of the file:
mapping touches no page, and mincore reports the page cache's state without faulting anything in, so
measuring does not change what is measured. Linux and macOS (libc through ctypes); elsewhere None.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

PAGE = mmap.PAGESIZE
# The page cache holds a file in folios of up to 2 MB on Linux (x86-64 and arm64 with 4 KB pages: the PMD size),
# and a drop evicts only the folios that lie wholly inside its range. Reads of neighbouring chunks leave folios
# straddling their boundary that neither chunk's drop covers: a 134 MB bf16 embedding read in 2 MB chunks by
# 4 threads left most of itself cached until the shard's final drop (the page-cache test in
# tests/budget/test_streamer_memory.py catches it). `drop` widens its range to this alignment; a neighbour's page it
# evicts early is one that neighbour has read already, is reading (locked: left alone) or would read from the
# disk anyway.
FOLIO_ALIGN = 2 << 20
DIRECT_ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and addresses: any logical block size divides it
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()


def resident_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of `path` in the page cache now (whole pages; the last one counts in full), or None where
    mincore is not available."""
    size = os.path.getsize(path)
    if _LIBC is None or not hasattr(_LIBC, "mincore"):
        return None
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * PAGE  # bit 0: the page is resident
        finally:
            _LIBC.munmap(addr, size)
    finally:
        os.close(fd)


def resident_total(paths: Iterable[str | os.PathLike]) -> int | None:
    """`resident_bytes` summed over files (None if it is unknown for any)."""
    total = 0
    for p in paths:
        n = resident_bytes(p)
        if n is None:
            return None
        total += n
    return total


def drop(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to evict the pages holding [offset, offset + length) of the open file from the page cache
    (length 0: to the end). The range is widened to FOLIO_ALIGN boundaries: the kernel keeps a page, or a large
    folio, that the range only partly covers. Clean pages go at once; dirty ones (a file just written) only
    after writeback."""
    if hasattr(os, "posix_fadvise"):
        start = offset - offset % FOLIO_ALIGN
        end = 0 if length == 0 else offset + length + (-(offset + length)) % FOLIO_ALIGN
        os.posix_fadvise(fd, start, end - start if end else 0, os.POSIX_FADV_DONTNEED)


def drop_file(path: str | Path) -> None:
    """`drop` for a whole file, by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop(fd)
    finally:
        os.close(fd)


# --- reading past the cache ----------------------------------------------------------------------------------


def open_direct(path: str | os.PathLike) -> int | None:
    """A descriptor that reads `path` with O_DIRECT, or None where the OS or the filesystem has no such reads
    (macOS, tmpfs, some network filesystems)."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None


def align_down(n: int) -> int:
    return n - n % DIRECT_ALIGN


def align_up(n: int) -> int:
    return n + (-n) % DIRECT_ALIGN


def aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `nbytes` whose first byte sits at an address O_DIRECT accepts."""
    raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % DIRECT_ALIGN
    return raw[skip : skip + nbytes]


def read_direct(fd: int, out: torch.Tensor, offset: int, need: int, path: Path) -> None:
    """Fill the aligned uint8 tensor `out` (address, length and `offset` multiples of DIRECT_ALIGN) from an
    O_DIRECT descriptor; the file may end inside `out`'s last block, but not before `need` bytes."""
    view = memoryview(out.numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    if done < need:
        raise CheckpointError(f"{path}: file ends at byte {offset + done}, inside a tensor (truncated?)")


# --- huge pages for the model's own memory -------------------------------------------------------------------

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def prefer_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to back the tensor's memory with 2 MB pages (transparent huge pages in "madvise" mode, the common
    default): a load touching 6 GB of fresh memory then takes ~3,000 page faults instead of ~1.5 million, which on a
    virtual machine were most of a load from the page cache. Only whole 2 MB blocks inside the tensor; a no-op where
    the OS has no such advice, or for small tensors."""
    if _LIBC is None or not hasattr(_LIBC, "madvise") or tensor.device.type != "cpu" or tensor.nbytes < 2 * HUGE_PAGE:
        return
    start = tensor.data_ptr()
    first = start + (-start) % HUGE_PAGE
    end = (start + tensor.nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > first:
        _LIBC.madvise(first, end - first, _MADV_HUGEPAGE)  # advice: a failure changes nothing but speed


# --- reading the page cache in place ---------------------------------------------------------------------------


@contextlib.contextmanager
def cached_view(fd: int, offset: int, nbytes: int) -> Iterator[torch.Tensor | None]:
    """Bytes [offset, offset + nbytes) of an open file as a uint8 tensor read in place from the page cache, for
    the `with` block (read it only; it is unmapped after), or None where a page of the range is not cached now.

    A chunk the loader converts (quantizes, or casts to another dtype) is otherwise read into a staging buffer
    first: the bytes cross memory three times (the cache, the buffer written, the buffer read) before the result
    is written; computed from a mapping of the cache's pages they cross it once (docs/performance.md has the
    measurement). Mapping touches nothing, and mincore(2) tells whether every page is resident; where one is not,
    the caller reads the range as before (a fault on a page not in the cache is a synchronous read, slower than
    the loader's reads in flight). The mapping covers the range alone, so the process's file-backed RSS holds
    only the chunks in use: the kernel maps pages around a fault, and over one mapping of the whole file a load
    held 4x its chunks. A file truncated while mapped would fault (SIGBUS) where a read fails: the headers were
    checked against the file's size before any read, and ranges past the size now are refused.
    """
    start = offset - offset % PAGE
    length = offset + nbytes - start
    if _LIBC is None or not hasattr(_LIBC, "mincore") or nbytes <= 0 or offset + nbytes > os.fstat(fd).st_size:
        yield None
        return
    addr = _LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        yield None
        return
    try:
        vec = (ctypes.c_ubyte * ((length + PAGE - 1) // PAGE))()
        cached = _LIBC.mincore(addr, length, vec) == 0 and bool((np.frombuffer(vec, dtype=np.uint8) & 1).all())
        yield (
            torch.frombuffer((ctypes.c_ubyte * nbytes).from_address(addr + offset - start), dtype=torch.uint8)
            if cached
            else None
        )
    finally:
        _LIBC.munmap(addr, length)
