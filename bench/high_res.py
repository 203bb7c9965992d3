"""High resolutions: PaliGemma 2 3B at 448 px (1,024 image tokens) and 896 px (4,096: longer than Gemma 2's 4,096-
token sliding window), ours against transformers, and our peak RSS against memory.py's estimate for the request.

    python -m bench.high_res [--runs ours-448,hf-448,ours-896] [--tokens 8]

Full-size synthetic checkpoints in bfloat16 (bench/common.py); each run in a fresh process (bench/supervise.py),
the same prompt (image tokens + BOS + 3 text tokens + newline), greedy, bfloat16, 2 threads; one generation of
1 token (prefill: image encoding + prefill + first token) and one of 1 + TOKENS (decode rate from the difference).
Ours with this machine's kernel plan (bench/load_speed.py's) so that no kernel is timed in the measurement. The
estimate is what the load pre-flight and a budget count: the weights (`load_memory_bytes`) plus the request
(`budget.memory.request_bytes`: KV cache and the largest activations, attention a chunk of queries at a time).
transformers at 896 px is left out by default: its bfloat16 prefill of 4,100 tokens takes many minutes on a CPU
without native bfloat16. Writes docs/results/high_res.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import ROOT, ensure_checkpoint
from bench.load_speed import KERNELS
from bench.report import command, gb, header, md_table, set_threads, text_table, verdict, write
from bench.supervise import protect_the_machine, run_child

THREADS = 2
RUNS = {"ours-448": ("ours", 448), "hf-448": ("hf", 448), "ours-896": ("ours", 896), "hf-896": ("hf", 896)}
DEFAULT_RUNS = ("ours-448", "hf-448", "ours-896")


def child(name: str, path: Path, tokens: int, out: Path) -> None:
    protect_the_machine()
    import torch

    from lowmem_paligemma.budget.memory import request_bytes
    from lowmem_paligemma.model.config import load_config
    from lowmem_paligemma.pretrained.load import load_memory_bytes
    from lowmem_paligemma.profiling.profiler import MemoryProfiler, reset_peak

    set_threads(THREADS)
    impl, _ = RUNS[name]
    cfg = load_config(path)
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [cfg.bos_token_id, 1000, 2000, 3000, 108]])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    if impl == "ours":
        from lowmem_paligemma import generate, load_model

        model = load_model(path, dtype=torch.bfloat16, kernels=KERNELS).model
        run = lambda n: list(generate(model, ids, pixel_values=pixels, max_new_tokens=n, eos_token_ids=[]))  # noqa: E731
    else:
        from transformers import PaliGemmaForConditionalGeneration

        model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()

        def run(n: int) -> list[int]:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, pixel_values=pixels.bfloat16(), token_type_ids=torch.zeros_like(ids),
                    attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                )  # fmt: skip
            return out[0, ids.shape[1] :].tolist()

    reset_peak()
    with MemoryProfiler(interval=0.05) as prof:
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(1 + tokens)
        t2 = time.perf_counter()
    peak = prof.peak()
    prefill = t1 - t0
    estimate = (
        load_memory_bytes(path, torch.bfloat16) + request_bytes(cfg, ids.shape[1], 1 + tokens, torch.bfloat16).total
    )
    out.write_text(json.dumps({"prefill_s": prefill, "decode_tps": tokens / ((t2 - t1) - prefill),
                               "prompt_tokens": ids.shape[1], "peak_rss": peak.hwm or peak.rss, "peak_anon": peak.anon,
                               "estimate": estimate}))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated: " + ", ".join(RUNS))
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.checkpoint, args.tokens, args.out)
        return
    out_dir = ROOT / "out" / "high_res"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.runs.split(","):
        path = ensure_checkpoint("bf16", f"paligemma2-3b-{RUNS[name][1]}")
        print(f"running {name} ...", file=sys.stderr, flush=True)
        c = run_child("bench.high_res", ["--child", name, "--checkpoint", str(path), "--tokens", str(args.tokens)],
                      out_dir / f"{name}.json", out_dir / f"{name}.log", timeout_s=3600)  # fmt: skip
        results[name] = c.result if c.status == "ok" else {"error": f"{c.status} {c.note}"}
        print(f"  {results[name]}", file=sys.stderr)
    cols = ("run", "prompt tokens", "prefill + 1 token (s)", "decode (tok/s)", "vs transformers (prefill / decode)",
            "peak RSS (anon)", "estimate (weights + request)", "within it")  # fmt: skip
    rows, targets = [], []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, r["error"], *["-"] * 6])
            continue
        hf = results.get(f"hf-{RUNS[name][1]}", {})
        vs = "-"
        if name.startswith("ours") and "prefill_s" in hf:
            vs = f"{r['prefill_s'] / hf['prefill_s']:.2f}x / {r['decode_tps'] / hf['decode_tps']:.2f}x"
            targets.append([f"{name} prefill <= 1.0x transformers", f"{r['prefill_s'] / hf['prefill_s']:.2f}x",
                            verdict(r["prefill_s"] <= hf["prefill_s"])])  # fmt: skip
            targets.append([f"{name} decode >= 1.2x transformers", f"{r['decode_tps'] / hf['decode_tps']:.2f}x",
                            verdict(r["decode_tps"] >= 1.2 * hf["decode_tps"])])  # fmt: skip
        within = r["peak_rss"] <= r["estimate"]
        if name.startswith("ours"):
            targets.append([f"{name} peak RSS within the estimate", f"{gb(r['peak_rss'])} / {gb(r['estimate'])}",
                            verdict(within)])  # fmt: skip
        peak = f"{gb(r['peak_rss'])} ({gb(r['peak_anon'])})"
        rows.append([name, r["prompt_tokens"], f"{r['prefill_s']:.1f}", f"{r['decode_tps']:.2f}", vs, peak,
                     gb(r["estimate"]), "yes" if within else "no"])  # fmt: skip
    print(text_table(cols, rows))
    what = (f"PaliGemma 2 3B at 448 and 896 px, full-size synthetic bfloat16 checkpoints; {THREADS} threads; greedy; "
            f"{args.tokens} decoded tokens; ours with kernels {KERNELS}.")  # fmt: skip
    doc = header("High resolutions", command("bench.high_res", argv), what)
    doc += [*md_table(cols, rows), "", "## Targets", "", *md_table(("target", "this run", "verdict"), targets)]
    write("high_res", doc)


if __name__ == "__main__":
    main()
