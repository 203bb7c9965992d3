"""Run one measurement in a fresh child process and watch it, so the machine survives a run that would not.

Each configuration is measured in its own process (its RSS is its own, nothing is cached from a previous
run). The parent polls MemAvailable every 0.1 s and kills a child that would take the machine under 1 GB,
or that runs past its time limit; the child's own in-process measurements are the results, the polling is
only the safety net. A child writes its result as JSON to the path it is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import ROOT, mem_available

KILL_BELOW_BYTES = 1_000_000_000
POLL_S = 0.1


@dataclass
class ChildResult:
    status: str  # "ok", "failed (exit N)", "killed: ..."
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    min_mem_available: int = 0


def run_child(module: str, args: list[str], out: Path, log: Path, timeout_s: float = 900) -> ChildResult:
    """`python -m module *args --out OUT` with stdout/stderr to `log`; the JSON it writes to `out` comes back."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(log, "w") as log_f:
        proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        t0, low = time.monotonic(), mem_available()
        while proc.poll() is None:
            avail = mem_available()
            low = min(low, avail)
            if avail < KILL_BELOW_BYTES:
                proc.kill()
                proc.wait()
                return ChildResult("killed: would exhaust RAM", f"MemAvailable fell to {avail / 1e9:.2f} GB", {}, low)
            if time.monotonic() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                return ChildResult(f"killed: over {timeout_s:.0f} s", "", {}, low)
            time.sleep(POLL_S)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return ChildResult(f"failed (exit {proc.returncode})", tail[0][:200], {}, low)
    return ChildResult("ok", "", json.loads(out.read_text()), low)


def protect_the_machine() -> None:
    """In a child: if the kernel must kill something for memory, let it be this process."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
