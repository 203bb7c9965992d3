"""In-process memory profiler: an RSS timeline with phase marks, saved as JSON.

What is special:
- Measured from inside the process (no `ps` polling from outside): a daemon thread reads
  `/proc/self/status` every `interval` seconds and splits VmRSS into RssAnon (heap, tensors
  we own), RssFile (mmap'd checkpoint pages, reclaimable) and RssShmem, plus the kernel's own
  high-water mark VmHWM, which catches spikes shorter than the sampling interval.
- `mark(name)` samples immediately in the calling thread, so a phase shorter than the interval
  still appears in the timeline at its true height.
- CUDA allocator totals are added only when torch is already imported and CUDA already
  initialised by the caller; the profiler never imports torch or creates a CUDA context.
- Without /proc (macOS) it falls back to psutil: rss only, anon/file/shmem are None and the
  high-water mark comes from getrusage.

Usage:
    with MemoryProfiler(interval=0.05, meta={"label": "stream", "model_bytes": n}) as prof:
        prof.mark("build")
        with prof.phase("materialize"):
            ...
    prof.to_json("out/stream.json")
    timeline = Timeline.from_json("out/stream.json")

Conventional `meta` keys read by `plot.py`: "label" (title / legend name), "model_bytes"
(final weight bytes, drawn as a reference line), "total_ram" (filled in by the profiler).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

TIMELINE_VERSION = 1

# Module-level so tests can point them at a missing file to exercise the psutil fallback.
_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")

# /proc/self/status field -> our name; values are in kB.
_STATUS_FIELDS = {b"VmRSS:": "rss", b"RssAnon:": "anon", b"RssFile:": "file", b"RssShmem:": "shmem", b"VmHWM:": "hwm"}


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the profiler started
    rss: int  # bytes, VmRSS = anon + file + shmem
    anon: int | None  # None where the OS does not split RSS (macOS, kernels before 4.5)
    file: int | None
    shmem: int | None
    hwm: int | None  # VmHWM: the kernel's peak RSS since process start (or the last reset_peak)
    cuda_alloc: int | None = None  # summed over devices; None unless CUDA was initialised
    cuda_reserved: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    t: float
    name: str


@dataclass(frozen=True, slots=True)
class Peak:
    # Each field is the max of its own series; they need not come from the same sample.
    rss: int
    anon: int | None
    file: int | None
    hwm: int | None
    t: float  # when the rss peak was sampled
    cuda_alloc: int | None = None


def _max_or_none(values: Iterator[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


@dataclass
class Timeline:
    meta: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def peak(self) -> Peak:
        if not self.samples:
            raise ValueError("empty timeline: no samples recorded")
        top = max(self.samples, key=lambda s: s.rss)
        return Peak(
            rss=top.rss,
            anon=_max_or_none(s.anon for s in self.samples),
            file=_max_or_none(s.file for s in self.samples),
            hwm=_max_or_none(s.hwm for s in self.samples),
            t=top.t,
            cuda_alloc=_max_or_none(s.cuda_alloc for s in self.samples),
        )

    def summary(self) -> dict[str, Any]:
        peak = self.peak()
        first, last = self.samples[0], self.samples[-1]
        return {
            "duration_s": last.t - first.t,
            "samples": len(self.samples),
            "start_rss": first.rss,
            "peak_rss": peak.rss,
            "peak_anon": peak.anon,
            "peak_file": peak.file,
            "final_rss": last.rss,
            "hwm": peak.hwm,
            "peak_cuda_alloc": peak.cuda_alloc,
        }

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        # The summary is derived data, written for readers (jq, the lead's tables); from_json recomputes it.
        doc = {
            "version": TIMELINE_VERSION,
            "meta": self.meta,
            "samples": [asdict(s) for s in self.samples],
            "marks": [asdict(m) for m in self.marks],
            "summary": self.summary() if self.samples else {},
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Compact: a long run holds tens of thousands of samples.
        path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Timeline:
        doc = json.loads(Path(path).read_text())
        if doc.get("version") != TIMELINE_VERSION:
            raise ValueError(f"{path}: timeline version {doc.get('version')!r}, expected {TIMELINE_VERSION}")
        # Sample(**d) is strict: an unknown key raises rather than being dropped silently.
        return cls(
            meta=doc["meta"],
            samples=[Sample(**s) for s in doc["samples"]],
            marks=[Mark(**m) for m in doc["marks"]],
        )


# --- one reading ---------------------------------------------------------------------------


def _parse_status(raw: bytes) -> dict[str, int | None]:
    out: dict[str, int | None] = dict.fromkeys(_STATUS_FIELDS.values())
    for line in raw.splitlines():
        parts = line.split()  # [b"VmRSS:", b"1732", b"kB"]
        name = _STATUS_FIELDS.get(parts[0]) if parts else None
        if name is not None:
            out[name] = int(parts[1]) * 1024
    return out


def _read_psutil() -> dict[str, int | None]:
    import psutil

    rss = psutil.Process().memory_info().rss
    return {"rss": rss, "anon": None, "file": None, "shmem": None, "hwm": _rusage_peak()}


def _rusage_peak() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is bytes on macOS, kB on Linux and the BSDs.
    return peak if sys.platform == "darwin" else peak * 1024


def _cuda_bytes() -> tuple[int | None, int | None]:
    # Only look if the caller already imported torch and initialised CUDA: importing torch here
    # would cost ~300 MB of RSS and a CUDA context several hundred MB of device memory.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None, None
    devices = range(torch.cuda.device_count())
    return (
        sum(torch.cuda.memory_allocated(d) for d in devices),
        sum(torch.cuda.memory_reserved(d) for d in devices),
    )


def current_rss(pid: int | None = None) -> dict[str, int | None]:
    """One reading in bytes: rss, anon, file, shmem, hwm (None where the OS does not report it), of this process or
    of process `pid` (a server measured by its client)."""
    try:
        return _parse_status((_PROC_STATUS if pid is None else Path(f"/proc/{pid}/status")).read_bytes())
    except OSError:
        if pid is None:
            return _read_psutil()
        import psutil

        return {"rss": psutil.Process(pid).memory_info().rss, "anon": None, "file": None, "shmem": None, "hwm": None}


def peak_rss_bytes() -> int | None:
    """The process's peak RSS so far (VmHWM, or getrusage where /proc is missing)."""
    return current_rss()["hwm"]


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS by writing "5" to /proc/self/clear_refs (Linux 4.0+).

    Returns False where that is not permitted (no /proc, old kernel, some sandboxes and
    seccomp profiles); peaks read afterwards then still include everything since process start.
    """
    try:
        with _PROC_CLEAR_REFS.open("w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf on Windows
        try:
            import psutil
        except ImportError:
            return None
        return psutil.virtual_memory().total


# --- the sampler ---------------------------------------------------------------------------


class MemoryProfiler:
    """Samples this process's memory on a daemon thread; `mark` records named phase boundaries."""

    def __init__(self, interval: float = 0.05, meta: dict[str, Any] | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.meta: dict[str, Any] = dict(meta or {})  # user metadata, saved with the timeline
        self._system_meta: dict[str, Any] = {}
        self._samples: list[Sample] = []
        self._marks: list[Mark] = []
        # One lock around "read clock, read memory, append" keeps samples and marks from both
        # threads in time order.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._t0 = 0.0

    # -- lifecycle --

    def start(self) -> Self:
        if self.running:
            raise RuntimeError("profiler already running")
        try:
            # Keep the fd open and pread it: no open/close or Path objects per sample.
            self._fd = os.open(_PROC_STATUS, os.O_RDONLY)
            source = "proc"
        except OSError:
            self._fd = None
            source = "psutil"
        self._t0 = time.perf_counter()
        self._system_meta = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "total_ram": total_ram_bytes(),
            "started_at": datetime.now().astimezone().isoformat(timespec="milliseconds"),
            "interval": self.interval,
            "source": source,
        }
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="MemoryProfiler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()  # the final state, however soon after the last tick
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()  # returns None: an exception from the body propagates

    def _run(self) -> None:
        # Event.wait rather than sleep so stop() does not wait out a full interval.
        while not self._stop.wait(self.interval):
            self._sample()

    def _read(self) -> dict[str, int | None]:
        if self._fd is None:
            return _read_psutil()
        return _parse_status(os.pread(self._fd, 8192, 0))

    def _sample(self, mark: str | None = None) -> None:
        with self._lock:
            t = round(time.perf_counter() - self._t0, 6)  # microseconds: exact through JSON
            cuda_alloc, cuda_reserved = _cuda_bytes()
            self._samples.append(Sample(t=t, **self._read(), cuda_alloc=cuda_alloc, cuda_reserved=cuda_reserved))
            if mark is not None:
                self._marks.append(Mark(t=t, name=mark))

    # -- phases --

    def mark(self, name: str) -> None:
        """Record a phase boundary, with a sample taken now so short phases are never missed."""
        if self._thread is None:
            raise RuntimeError("mark() outside start()/stop(): use `with MemoryProfiler() as prof:`")
        self._sample(mark=name)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Marks `name` on entry and `name done` (or `name failed`) on exit."""
        self.mark(name)
        try:
            yield
        except BaseException:
            self.mark(f"{name} failed")
            raise
        self.mark(f"{name} done")

    # -- results --

    def timeline(self) -> Timeline:
        """A snapshot; safe to call while the sampler is still running."""
        with self._lock:
            return Timeline(
                meta={**self._system_meta, **self.meta}, samples=list(self._samples), marks=list(self._marks)
            )

    def peak(self) -> Peak:
        return self.timeline().peak()

    def summary(self) -> dict[str, Any]:
        return self.timeline().summary()

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        return self.timeline().to_json(path)
