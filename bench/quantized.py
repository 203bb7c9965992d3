"""Quantized weights on full-size synthetic checkpoints: what they cost in logits, and the big models they make fit.

    python -m bench.quantized [--parts quality,10b,28b] [--tokens 16]

- quality: PaliGemma-3B from its bf16 checkpoint, int8 and int4 against the bf16 model on the same prompt
  (256 image tokens + text), teacher-forced over 24 text positions: relative RMS logit error (RMS of the
  difference over the standard deviation of the bf16 logits) and top-1 agreement. Random weights are not real
  weights: this bounds the arithmetic, not the quality of a real checkpoint.
- 10b: PaliGemma 2 10B written in the Hub's bf16 layout (~19 GB on disk, once), loaded with int8: peak RSS
  (target <= 11 GB) with its anon / file split, load time, then a greedy generation with its tokens/s.
- 28b: PaliGemma 2 28B (~55 GB bf16 on disk) with int4: peak RSS (target <= 16 GB) and tokens/s, when the disk
  holds the checkpoint (it is written once and can be deleted after: `--delete-after`).
Each model runs in its own fresh, RAM-guarded child process. Writes docs/results/quantized.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.common import checkpoint_bytes, checkpoint_path, ensure_checkpoint
from bench.report import ROOT, command, gb, header, md_table, set_threads, verdict, write
from bench.supervise import protect_the_machine, run_child

THREADS = 2
TEXT = 24  # teacher-forced text positions compared in the quality part
BIG = {"10b": ("paligemma2-10b-224", "int8", 11e9), "28b": ("paligemma2-28b-224", "int4", 16e9)}


def _inputs(cfg, text: int):
    import torch

    g = torch.Generator().manual_seed(0)
    words = torch.randint(1000, 200_000, (text,), generator=g) % cfg.text.vocab_size
    ids = torch.cat([torch.full((cfg.num_image_tokens,), cfg.image_token_index), torch.tensor([cfg.bos_token_id]),
                     words])[None]  # fmt: skip
    types = torch.zeros_like(ids)
    types[:, cfg.num_image_tokens + 1 + text // 2 :] = 1  # the second half as a causal suffix
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    return ids, types, pixels


def child_quality(path: Path, mode: str, out: Path) -> None:
    """Logits of the last TEXT positions (float32) for `mode` ('bf16', 'int8', 'int4') saved to out + '.pt'."""
    import torch

    from lowmem_paligemma import load_model
    from lowmem_paligemma.model.config import load_config

    cfg = load_config(path)
    ids, types, pixels = _inputs(cfg, TEXT)
    model = load_model(path, dtype=torch.bfloat16, quantize=None if mode == "bf16" else mode).model
    with torch.inference_mode():
        logits = model(ids, pixels, token_type_ids=types)[0, -TEXT:].float()
    torch.save(logits, str(out) + ".pt")
    out.write_text(json.dumps({"mode": mode, "weight_bytes": sum(p.nbytes for p in model.parameters())}))


def child_big(path: Path, mode: str, tokens: int, out: Path) -> None:
    import torch

    from lowmem_paligemma import generate, load_model
    from lowmem_paligemma.model.config import load_config
    from lowmem_paligemma.profiling.profiler import MemoryProfiler, current_rss

    cfg = load_config(path)
    ids, _, pixels = _inputs(cfg, 4)
    with MemoryProfiler(interval=0.05) as prof:
        t0 = time.perf_counter()
        loaded = load_model(path, dtype=torch.bfloat16, quantize=mode)
        model = loaded.model
        load_s = time.perf_counter() - t0
        loaded = current_rss()
        t0 = time.perf_counter()
        stream = generate(model, ids, pixel_values=pixels, max_new_tokens=tokens, eos_token_ids=[])
        first = next(stream)
        t1 = time.perf_counter()
        rest = list(stream)
        t2 = time.perf_counter()
    peak = prof.peak()
    out.write_text(json.dumps({
        "load_s": load_s, "loaded_rss": loaded["rss"], "peak_rss": peak.hwm or peak.rss, "peak_anon": peak.anon,
        "peak_file": peak.file, "weight_bytes": sum(p.nbytes for p in model.parameters()),
        "prefill_s": t1 - t0, "decode_tps": len(rest) / (t2 - t1), "tokens": [first, *rest],
        "kernels": loaded.kernels.lines(),
    }))  # fmt: skip


def quality(out_dir: Path) -> list[str]:
    import torch

    path = ensure_checkpoint("bf16")
    logits, sizes = {}, {}
    for mode in ("bf16", "int8", "int4"):
        out = out_dir / f"quality-{mode}.json"
        c = run_child("bench.quantized", ["--child-quality", mode, "--checkpoint", str(path)], out,
                      out_dir / f"quality-{mode}.log")  # fmt: skip
        if c.status != "ok":
            return [f"quality: {mode} {c.status} {c.note}"]
        logits[mode], sizes[mode] = torch.load(str(out) + ".pt"), c.result["weight_bytes"]
    ref = logits["bf16"]
    rows = []
    for mode in ("int8", "int4"):
        diff = logits[mode] - ref
        rel = (diff.pow(2).mean().sqrt() / ref.std()).item()
        agree = (logits[mode].argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append([mode, gb(sizes[mode]), f"{rel:.4f}", f"{agree:.0%} of {TEXT}", f"{diff.abs().max().item():.3f}"])
    return [
        "## Logits against the bf16 model (PaliGemma-3B, random weights)",
        "",
        *md_table(("weights", "GB", "relative RMS logit error", "top-1 agreement", "max abs error"), rows),
        "",
    ]


def big(part: str, tokens: int, out_dir: Path, delete_after: bool) -> list[str]:
    preset, mode, target = BIG[part]
    need = {"10b": 20e9, "28b": 56e9}[part]
    path = checkpoint_path("bf16", preset)
    free = shutil.disk_usage(path.parent if path.parent.exists() else ROOT).free
    if not (path / ".complete").is_file() and free < need * 1.05:
        return [f"## {preset} with {mode}", "", f"Not run: the bf16 checkpoint needs {gb(need, 0)} GB of disk, "
                f"{gb(free, 0)} GB free.", ""]  # fmt: skip
    t0 = time.perf_counter()
    path = ensure_checkpoint("bf16", preset)
    written = time.perf_counter() - t0
    out = out_dir / f"{part}.json"
    c = run_child("bench.quantized", ["--child-big", part, "--checkpoint", str(path), "--tokens", str(tokens)], out,
                  out_dir / f"{part}.log", timeout_s=3600)  # fmt: skip
    lines = [f"## {preset} with --quantize {mode}", ""]
    if c.status != "ok":
        lines += [f"{c.status} {c.note}", ""]
    else:
        r = c.result
        rows = [[f"{gb(checkpoint_bytes(path))} GB bf16", gb(r["weight_bytes"]), f"{r['load_s']:.0f}",
                 f"{gb(r['peak_rss'])} ({gb(r['peak_anon'])} / {gb(r['peak_file'])})",
                 f"<= {gb(target, 0)}: {verdict(r['peak_rss'] <= target)}", f"{r['prefill_s']:.1f}",
                 f"{r['decode_tps']:.2f}"]]  # fmt: skip
        cols = ("checkpoint", "weights GB", "load s", "peak RSS (anon / file)", "target", "prefill + 1 token s",
                "decode tok/s")  # fmt: skip
        lines += [*md_table(cols, rows), "", f"Greedy tokens: {r['tokens']}. Kernels: {'; '.join(r['kernels'])}.", ""]
        if written > 1:
            lines += [f"(The checkpoint was written for this run in {written:.0f} s.)", ""]
    if delete_after:
        shutil.rmtree(path)
        lines += ["The checkpoint was deleted after the run (`--delete-after`).", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="quality,10b,28b")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens generated by the big models")
    p.add_argument("--delete-after", action="store_true", help="delete each big checkpoint after its run")
    p.add_argument("--child-quality", help=argparse.SUPPRESS)
    p.add_argument("--child-big", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_quality or args.child_big:
        protect_the_machine()
        set_threads(THREADS)
        if args.child_quality:
            child_quality(args.checkpoint, args.child_quality, args.out)
        else:
            child_big(args.checkpoint, BIG[args.child_big][1], args.tokens, args.out)
        return
    cmd = command("bench.quantized", argv)
    out_dir = ROOT / "out" / "quantized"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for part in args.parts.split(","):
        print(f"{part} ...", file=sys.stderr, flush=True)
        lines += quality(out_dir) if part == "quality" else big(part, args.tokens, out_dir, args.delete_after)
    what = (f"Full-size synthetic checkpoints in the Hub layout (bench/common.py), {THREADS} threads; each model in "
            "its own process; peak RSS is VmHWM, with the sampled anon / file maxima.")  # fmt: skip
    write("quantized", header("Quantized weights: logits and big models", cmd, what) + lines)


if __name__ == "__main__":
    main()
