"""MemoryProfiler and the timeline plots: marks, a known allocation, JSON round trip, PNG output."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from lowmem_paligemma.profiling import profiler
from lowmem_paligemma.profiling.plot import _spread, plot_comparison, plot_timeline
from lowmem_paligemma.profiling.profiler import (
    Mark,
    MemoryProfiler,
    Sample,
    Timeline,
    current_rss,
    peak_rss_bytes,
    reset_peak,
)

MB = 10**6
PAGE = 4096
proc_only = pytest.mark.skipif(not profiler._PROC_STATUS.exists(), reason="needs /proc (RssAnon)")


def _touched(nbytes: int) -> np.ndarray:
    # np.empty maps untouched pages, which RSS does not count: write one byte per page.
    buf = np.empty(nbytes, dtype=np.uint8)
    buf[::PAGE] = 1
    return buf


def _profiler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "MemoryProfiler"]


def _synthetic(n_marks: int, label: str) -> Timeline:
    samples = [
        Sample(t=i * 0.1, rss=(1 + i % 7) * 2**28, anon=(i % 7) * 2**28, file=2**28, shmem=0, hwm=7 * 2**28)
        for i in range(100)
    ]
    # Marks crowded at the start and every 0.2 s after, like shard marks after a fast build.
    marks = [Mark(t=0.001 * i, name=f"phase {i}") for i in range(3)]
    marks += [Mark(t=0.2 * (i + 1), name=f"shard {i + 1}/{n_marks}") for i in range(n_marks)]
    return Timeline(meta={"label": label, "model_bytes": 2**30}, samples=samples, marks=marks)


def test_marks_in_order_with_monotonic_time():
    with MemoryProfiler(interval=0.01) as prof:
        prof.mark("build")
        with prof.phase("materialize"):
            time.sleep(0.03)
        for i in range(3):
            prof.mark(f"shard {i + 1}/3")
    tl = prof.timeline()
    names = [m.name for m in tl.marks]
    assert names == ["build", "materialize", "materialize done", "shard 1/3", "shard 2/3", "shard 3/3"]
    times = [m.t for m in tl.marks]
    assert times == sorted(times)
    sample_times = [s.t for s in tl.samples]
    assert sample_times == sorted(sample_times)
    # Every mark carries its own sample at exactly its time.
    assert set(times) <= set(sample_times)
    # The 30 ms sleep at a 10 ms interval: the thread sampled on its own too.
    assert len(tl.samples) > len(tl.marks) + 2


def test_phase_marks_failure_and_propagates():
    with pytest.raises(KeyError), MemoryProfiler() as prof, prof.phase("load"):
        raise KeyError("boom")
    assert [m.name for m in prof.timeline().marks] == ["load", "load failed"]


def test_mark_outside_the_profiler_raises():
    prof = MemoryProfiler()
    with pytest.raises(RuntimeError, match="start"):
        prof.mark("too early")


@proc_only
def test_known_allocation_shows_as_anon_growth():
    with MemoryProfiler(interval=0.02) as prof:
        prof.mark("before")
        buf = _touched(200 * MB)
        prof.mark("allocated")
        del buf
        prof.mark("freed")
    tl = prof.timeline()
    base = tl.samples[0]
    peak = prof.peak()
    assert peak.anon - base.anon >= 180 * MB
    assert peak.rss - base.rss >= 180 * MB
    assert peak.hwm >= peak.rss
    # The mark's immediate sample sees the buffer even if the thread never ticked while it lived.
    at = {m.name: next(s for s in tl.samples if s.t == m.t) for m in tl.marks}
    assert at["allocated"].anon - at["before"].anon >= 180 * MB
    assert at["allocated"].anon - at["freed"].anon >= 180 * MB  # large buffers are munmap'd on free

    summary = prof.summary()
    assert summary["peak_anon"] == peak.anon
    assert summary["final_rss"] == tl.samples[-1].rss
    assert summary["duration_s"] == tl.samples[-1].t - tl.samples[0].t


def test_json_round_trip(tmp_path):
    with MemoryProfiler(interval=0.01, meta={"label": "round trip", "model_bytes": 123}) as prof:
        prof.meta["note"] = "set after start"
        prof.mark("a")
        time.sleep(0.03)
        prof.mark("b")
    path = prof.to_json(tmp_path / "sub" / "timeline.json")
    tl = Timeline.from_json(path)
    assert tl == prof.timeline()
    assert tl.meta["label"] == "round trip" and tl.meta["note"] == "set after start"
    for key in ("hostname", "pid", "total_ram", "started_at"):
        assert key in tl.meta
    assert all(isinstance(s.rss, int) for s in tl.samples)
    assert tl.summary() == prof.summary()


def test_json_rejects_unknown_version(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"version": 2, "meta": {}, "samples": [], "marks": []}')
    with pytest.raises(ValueError, match="version"):
        Timeline.from_json(path)


def test_thread_stops_after_exception_in_body():
    with pytest.raises(ZeroDivisionError), MemoryProfiler(interval=0.01) as prof:
        assert prof.running
        1 / 0  # noqa: B018
    assert not prof.running
    assert not _profiler_threads()
    assert prof.timeline().samples  # what was sampled before the error is kept


def test_one_shot_readings():
    reading = current_rss()
    assert reading["rss"] > 0
    assert peak_rss_bytes() >= reading["rss"]


@proc_only
def test_reset_peak_lowers_hwm():
    buf = _touched(200 * MB)
    del buf
    before = peak_rss_bytes()
    if not reset_peak():
        pytest.skip("clear_refs not permitted here")
    assert peak_rss_bytes() <= before - 150 * MB


def test_psutil_fallback_without_proc(monkeypatch, tmp_path):
    pytest.importorskip("psutil")
    monkeypatch.setattr(profiler, "_PROC_STATUS", tmp_path / "missing")
    reading = current_rss()
    assert reading["rss"] > 0 and reading["anon"] is None and reading["file"] is None
    with MemoryProfiler(interval=0.01) as prof:
        prof.mark("x")
    tl = prof.timeline()
    assert tl.meta["source"] == "psutil"
    assert all(s.anon is None for s in tl.samples)
    assert prof.peak().anon is None


def test_spread_keeps_order_gap_and_bounds():
    assert _spread([0.5, 0.5, 0.5], 0.1) == pytest.approx([0.4, 0.5, 0.6])
    assert _spread([0.1, 0.9], 0.1) == pytest.approx([0.1, 0.9])  # far apart: untouched
    pos = _spread([0.0] * 5 + [1.0] * 5, 0.1)
    assert pos[0] >= 0 and pos[-1] <= 1 + 1e-12
    assert all(b - a >= 0.1 - 1e-12 for a, b in itertools.pairwise(pos))


def _assert_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width > 0 and img.height > 0


def test_plot_timeline_writes_png(tmp_path):
    with MemoryProfiler(interval=0.01, meta={"label": "real run"}) as prof:
        with prof.phase("alloc"):
            buf = _touched(20 * MB)
        del buf
    _assert_png(plot_timeline(prof.timeline(), tmp_path / "real.png"))
    # Many crowded marks, explicit reference lines, and a run with no anon/file split (macOS).
    crowded = _synthetic(40, "crowded")
    path = plot_timeline(crowded, tmp_path / "crowded.png", title="40 shards", model_bytes=2**30, ram_bytes=2**32)
    _assert_png(path)
    no_split = Timeline(
        meta={}, samples=[Sample(t=i, rss=2**28, anon=None, file=None, shmem=None, hwm=None) for i in range(3)]
    )
    _assert_png(plot_timeline(no_split, tmp_path / "no_split.png"))


def test_plot_comparison_writes_png(tmp_path):
    runs = {"stream": _synthetic(3, "stream"), "plain": _synthetic(10, "plain")}
    path = plot_comparison(runs, tmp_path / "cmp.png", title="stream vs plain")
    assert path == tmp_path / "cmp.png"
    _assert_png(path)


def test_another_process_is_read_with_its_split():
    # bench/serve.py watches the server from its client: the reading of a pid is that process's /proc/<pid>/status.
    import subprocess
    import sys

    code = "import sys, time; sys.stdin.readline(); b = bytearray(300_000_000); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        time.sleep(0.5)
        before = profiler.current_rss(child.pid)
        child.stdin.write(b"go\n")
        child.stdin.flush()
        deadline = time.monotonic() + 20
        while (after := profiler.current_rss(child.pid))["rss"] - before["rss"] < 300_000_000:
            assert time.monotonic() < deadline, "the child's allocation never showed in its reading"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    if after["anon"] is None:
        pytest.skip("this OS does not split RSS")
    assert after["anon"] - before["anon"] >= 300_000_000  # the child's bytearray, anonymous memory
    assert after["rss"] == after["anon"] + after["file"] + after["shmem"]
