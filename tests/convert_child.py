"""The peak memory of a `convert` in a fresh process (shared by tests/pretrained/test_convert.py and
tests/formats/test_compressed.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

_MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from lowmem_paligemma.pretrained.convert import convert_checkpoint
    from lowmem_paligemma.profiling.profiler import MemoryProfiler, current_rss, reset_peak

    src, dst, chunk, quantize = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] or None
    base = current_rss()
    hwm_reset = reset_peak()
    with MemoryProfiler(interval=0.01) as prof:
        convert_checkpoint(src, dst, dtype=torch.bfloat16, chunk_bytes=chunk, quantize=quantize)
    peak = prof.peak()
    print(json.dumps({"anon": peak.anon - base["anon"], "rss": peak.rss - base["rss"],
                      "hwm": (peak.hwm - base["rss"]) if hwm_reset else None}))
    """
)


def convert_growth(src: Path, dst: Path, chunk: int, quantize: str | None = None) -> dict:
    """Peak memory growth (bytes: anon, rss, hwm) of converting `src` to bf16 in a fresh process."""
    run = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(src), str(dst), str(chunk), quantize or ""],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(run.stdout)
