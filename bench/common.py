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


def machine_kernels(
    path: Path, quantize: str | None = None, zero_copy: bool = False, requests: int | None = None
) -> str:
    """This machine's kernel plan for the model at `path` loaded in bfloat16 (quantized to `quantize`), as a
    `--kernels` spec ("dense=packed/packed,..."): what `load_model` would choose (formats/chooser.py: its cache, or
    timed now), decided here, before any timed run, so that a timed load does not time the kernels too. Never a
    fixed spec: the choice differs from one CPU to the next. `requests`: as LoadOptions.requests (the CLI's
    generate loads for 1)."""
    from lowmem_paligemma.pretrained.build import build_model, choose_compute

    model, _ = build_model(path, quantize)
    _, report = choose_compute(model, "bfloat16", "cpu", zero_copy=zero_copy, requests=requests)
    return ",".join(f"{fmt}={choice}" for fmt, choice in sorted(report.plan.items()))


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def token_times(tokens) -> tuple[list[float], list[int]]:
    """(perf_counter() as each token of the iterable arrives, the tokens): ours' `generate` timed token by token."""
    times, ids = [], []
    for token in tokens:
        times.append(time.perf_counter())
        ids.append(int(token))
    return times, ids


def hf_token_times(model, new_tokens: int, **inputs) -> tuple[list[float], list[int]]:
    """`token_times` for transformers' greedy `generate` of `new_tokens` tokens (its streamer is handed the prompt
    first, then one token per step), so time to first token and the decode rate after it come from one
    generation, on the same clock as ours."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    times: list[float] = []
    ids: list[int] = []

    class Clock(BaseStreamer):
        prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                times.append(time.perf_counter())
                ids.append(int(value.reshape(-1)[0]))
            self.prompt_seen = True

        def end(self) -> None:
            pass

    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=Clock())  # fmt: skip
    return times, ids


def bench_prompt(cfg):
    """(ids (1, L), pixels (1, 3, S, S)): the image tokens, BOS, three text tokens and the newline; a fixed image."""
    import torch

    text = [t % cfg.text.vocab_size for t in (1000, 2000, 3000)]  # any vocabulary, tiny ones too
    ids = [cfg.image_token_index] * cfg.num_image_tokens + [cfg.bos_token_id, *text, 108]
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    return torch.tensor([ids]), pixels
