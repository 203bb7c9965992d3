"""Full-size synthetic checkpoints for the benchmarks: written once (in a child process) and reused.

They have the Hub's exact layout and sizes, with random weights (`lowmem_paligemma.pretrained.synth`). The Hub's
PaliGemma-3B main branch is float32 in 3 shards of <= 5 GB; its bfloat16 revision and PaliGemma 2 are bfloat16
(docs/model.md, "Checkpoint layout"). Set LOWMEM_CHECKPOINTS to keep them somewhere else than ./checkpoints.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

from bench.report import ROOT

CHECKPOINTS = Path(os.environ.get("LOWMEM_CHECKPOINTS", ROOT / "checkpoints"))
PRESET = "paligemma-3b-224"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MAX_SHARD_BYTES = 5_000_000_000


def _write(path: str, preset: str, kind: str) -> None:
    from lowmem_paligemma.checkpoint.safetensors_io import WEIGHT_DTYPES
    from lowmem_paligemma.model.config import PRESETS
    from lowmem_paligemma.pretrained.synth import write_checkpoint

    write_checkpoint(path, PRESETS[preset], dtype=WEIGHT_DTYPES[DTYPES[kind]], max_shard_bytes=MAX_SHARD_BYTES)


def checkpoint_path(kind: str = "fp32", preset: str = PRESET) -> Path:
    return CHECKPOINTS / f"{preset}-{kind}"


def ensure_checkpoint(kind: str = "fp32", preset: str = PRESET) -> Path:
    """The full-size synthetic checkpoint, written in a child process if missing (so the caller's peak RSS is
    not the writer's); `.complete` marks a finished one."""
    path = checkpoint_path(kind, preset)
    if (path / ".complete").is_file():
        return path
    print(f"writing full-size synthetic {preset} ({kind}) to {path} (once) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = mp.get_context("spawn").Process(target=_write, args=(str(path), preset, kind))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"writing {path} failed (exit code {proc.exitcode})")
    (path / ".complete").write_text("ok\n")
    print(f"  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
