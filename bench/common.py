"""Shared bench pieces: full-size synthetic PaliGemma-3B checkpoints, written once and reused."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = Path(os.environ.get("LOWMEM_CHECKPOINTS", ROOT / "checkpoints"))
PRESET = "paligemma-3b-224"
# The Hub's main branch is float32 in 3 shards of <= 5 GB; the bfloat16 revision fits in 2
# (docs/model.md, "Checkpoint layout").
KINDS = {"fp32": (torch.float32, 5_000_000_000), "bf16": (torch.bfloat16, 5_000_000_000)}


def _write(path: str, kind: str, preset: str) -> None:
    from lowmem_paligemma.config import PRESETS
    from lowmem_paligemma.synth import write_checkpoint

    dtype, shard = KINDS[kind]
    write_checkpoint(path, PRESETS[preset], dtype=dtype, max_shard_bytes=shard, seed=0)


def ensure_checkpoint(kind: str = "fp32", preset: str = PRESET) -> Path:
    """The full-size synthetic checkpoint of `preset` (config.PRESETS) stored as `kind`, written in a child
    process if missing (so the caller's peak RSS is not the writer's)."""
    path = CHECKPOINTS / f"{preset}-{kind}"
    done = path / ".complete"
    if done.is_file():
        return path
    print(f"writing full-size synthetic {preset} ({kind}) to {path} (once) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = mp.get_context("spawn").Process(target=_write, args=(str(path), kind, preset))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"writing {path} failed (exit code {proc.exitcode})")
    done.write_text("ok\n")
    print(f"  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"
