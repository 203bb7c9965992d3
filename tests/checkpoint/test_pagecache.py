"""Page-cache residency by mincore, dropping pages, and O_DIRECT reads of unaligned data."""

import os
from pathlib import Path

import pytest

from lowmem_paligemma import CheckpointError
from lowmem_paligemma.checkpoint.pagecache import (
    DIRECT_ALIGN,
    FOLIO_ALIGN,
    PAGE,
    align_down,
    align_up,
    aligned_empty,
    cached_view,
    drop,
    drop_file,
    open_direct,
    read_direct,
    resident_bytes,
)

SIZE = 2 * FOLIO_ALIGN + 123


@pytest.fixture
def data_file(tmp_path):
    data = os.urandom(SIZE)
    path = tmp_path / "data.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # clean pages: only those can be dropped
    drop_file(path)
    return path, data


def test_mincore_sees_reads_and_drops_without_faulting_pages_in(data_file):
    path, _ = data_file
    assert resident_bytes(path) == 0
    assert resident_bytes(path) == 0  # measuring touched nothing
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: exactly the pages read
        os.pread(fd, 10 * PAGE, FOLIO_ALIGN - 2 * PAGE)  # 2 pages below a folio boundary, 8 above
        assert resident_bytes(path) == 10 * PAGE
        drop(fd, FOLIO_ALIGN + PAGE + 1, 3 * PAGE)  # widened to the folio-aligned block it touches
        assert resident_bytes(path) == 2 * PAGE
        drop(fd)
        assert resident_bytes(path) == 0
    finally:
        os.close(fd)


def test_cached_views_read_resident_pages_in_place_and_nothing_else(data_file):
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        with cached_view(fd, 100, 3 * PAGE) as view:
            assert view is None  # nothing cached: the caller reads
        assert resident_bytes(path) == 0  # asking faulted nothing in
        os.pread(fd, 5 * PAGE, 0)  # pages 0-4 cached
        with cached_view(fd, 100, 3 * PAGE) as view:  # unaligned, inside pages 0-3
            assert bytes(view.numpy()) == data[100 : 100 + 3 * PAGE]
        with cached_view(fd, 5 * PAGE - 1, 2) as view:  # its second byte lies in page 5, not cached
            assert view is None
        with cached_view(fd, SIZE - 10, 11) as view:  # past the end: refused, never a fault
            assert view is None
        os.pread(fd, SIZE, 0)
        with cached_view(fd, SIZE - 10, 10) as view:
            assert bytes(view.numpy()) == data[-10:]
    finally:
        os.close(fd)


def test_empty_file(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    assert resident_bytes(tmp_path / "e") == 0


def test_aligned_buffers_and_rounding():
    for n in (1, 4096, 10_000):
        buf = aligned_empty(n)
        assert buf.numel() == n and buf.data_ptr() % DIRECT_ALIGN == 0
    assert align_down(DIRECT_ALIGN + 5) == DIRECT_ALIGN and align_up(DIRECT_ALIGN + 5) == 2 * DIRECT_ALIGN
    assert align_up(0) == 0 and align_up(DIRECT_ALIGN) == DIRECT_ALIGN


def test_direct_reads_bypass_the_cache_and_stop_at_the_end(data_file):
    path, data = data_file
    fd = open_direct(path)
    if fd is None:
        pytest.skip("this filesystem has no O_DIRECT")
    try:
        out = aligned_empty(align_up(SIZE))
        read_direct(fd, out, 0, SIZE, Path(path))  # the last block is partial: the file ends inside it
        assert bytes(out[:SIZE].numpy()) == data
        assert resident_bytes(path) == 0
        tail = aligned_empty(2 * DIRECT_ALIGN)
        read_direct(fd, tail, align_down(SIZE - 10), SIZE - align_down(SIZE - 10), Path(path))
        assert bytes(tail[: SIZE - align_down(SIZE - 10)].numpy()) == data[align_down(SIZE - 10) :]
        with pytest.raises(CheckpointError, match="file ends at byte"):
            read_direct(fd, tail, align_down(SIZE - 10), 2 * DIRECT_ALIGN, Path(path))
    finally:
        os.close(fd)
