"""High resolutions: PaliGemma 2 3B at 448 px (1,024 image tokens) and 896 px (4,096: longer than Gemma 2's 4,096-
token sliding window), ours against transformers, and our peak RSS against memory.py's estimate for the request.

    python -m bench.high_res [--runs ours-448,hf-448,ours-896] [--tokens 8]

Full-size synthetic checkpoints in bfloat16 (bench/common.py); each run in a fresh process (bench/supervise.py),
the same prompt (image tokens + BOS + 3 text tokens + newline), greedy, bfloat16, 2 threads; one generation of
1 + TOKENS tokens, each token's arrival timed (ours: as `generate` yields it; transformers: as its streamer gets
it): prefill is the time to the first token (image encoding + prefill + first token), decode the rate after it.
Ours with this machine's kernel plan (bench/load_speed.py's) so that no kernel is timed in the measurement. The
estimate is what the load pre-flight and a budget count: the weights (`load_memory_bytes`), the chosen kernels'
buffers (`residency.scratch_bytes`) and the request (`budget.memory.request_bytes`: KV cache and the largest
activations, attention a chunk of queries at a time).
transformers at 896 px is left out by default: its bfloat16 prefill of 4,100 tokens takes many minutes on a CPU
without native bfloat16. Writes docs/results/high_res.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import ROOT, bench_prompt, ensure_checkpoint, hf_token_times, machine_kernels, token_times
from bench.report import command, gb, header, md_table, set_threads, text_table, verdict, write
from bench.supervise import protect_the_machine, run_child

THREADS = 2
RUNS = {"ours-448": ("ours", 448), "hf-448": ("hf", 448), "ours-896": ("ours", 896), "hf-896": ("hf", 896)}
DEFAULT_RUNS = ("ours-448", "hf-448", "ours-896")


def child(name: str, path: Path, tokens: int, kernels: str, out: Path) -> None:
    protect_the_machine()
    import torch

    from lowmem_paligemma.budget.memory import request_bytes
    from lowmem_paligemma.budget.residency import scratch_bytes
    from lowmem_paligemma.model.config import load_config
    from lowmem_paligemma.pretrained.load import load_memory_bytes
    from lowmem_paligemma.profiling.profiler import MemoryProfiler, current_rss, reset_peak

    set_threads(THREADS)
    impl, _ = RUNS[name]
    cfg = load_config(path)
    ids, pixels = bench_prompt(cfg)
    if impl == "ours":
        from lowmem_paligemma import generate, load_model

        loaded = load_model(path, dtype=torch.bfloat16, kernels=kernels)
        model, buffers = loaded.model, scratch_bytes(loaded.model, loaded.kernels.plan, torch.bfloat16)

        def run(n: int) -> tuple[list[float], list[int]]:
            return token_times(generate(model, ids, pixel_values=pixels, max_new_tokens=n,
                                   eos_token_ids=[]))  # fmt: skip
    else:
        from transformers import PaliGemmaForConditionalGeneration

        model, buffers = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval(), 0
        inputs = {"input_ids": ids, "pixel_values": pixels.bfloat16(), "token_type_ids": torch.zeros_like(ids),
                  "attention_mask": torch.ones_like(ids)}  # fmt: skip

        def run(n: int) -> tuple[list[float], list[int]]:
            return hf_token_times(model, n, **inputs)

    at_load = current_rss()  # the weights and the runtime, before the request: which side of the estimate is off
    reset_peak()
    with MemoryProfiler(interval=0.05) as prof:
        t0 = time.perf_counter()
        times, _ = run(1 + tokens)
    peak = prof.peak()
    assert len(times) == 1 + tokens, f"{len(times)} tokens arrived, {1 + tokens} asked"
    prefill = times[0] - t0
    weights = load_memory_bytes(path, torch.bfloat16) + buffers  # what the load's pre-flight counts
    estimate = weights + request_bytes(cfg, ids.shape[1], 1 + tokens, torch.bfloat16).total
    out.write_text(json.dumps({"prefill_s": prefill, "decode_tps": tokens / (times[-1] - times[0]),
                               "prompt_tokens": ids.shape[1], "peak_rss": peak.hwm or peak.rss, "peak_anon": peak.anon,
                               "peak_file": peak.file,
                               "estimate": estimate, "rss_loaded": at_load["rss"], "anon_loaded": at_load["anon"],
                               "weights_estimate": weights}))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated: " + ", ".join(RUNS))
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--kernels", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.checkpoint, args.tokens, args.kernels, args.out)
        return
    out_dir = ROOT / "out" / "high_res"
    out_dir.mkdir(parents=True, exist_ok=True)
    results, plans = {}, {}
    for name in args.runs.split(","):
        path = ensure_checkpoint("bf16", f"paligemma2-3b-{RUNS[name][1]}")
        plans[name] = machine_kernels(path) if name.startswith("ours") else ""
        print(f"running {name} ...", file=sys.stderr, flush=True)
        c = run_child("bench.high_res", ["--child", name, "--checkpoint", str(path), "--tokens", str(args.tokens),
                                         "--kernels", plans[name]],
                      out_dir / f"{name}.json", out_dir / f"{name}.log", timeout_s=3600)  # fmt: skip
        results[name] = c.result if c.status == "ok" else {"error": f"{c.status} {c.note}"}
        print(f"  {results[name]}", file=sys.stderr)
    cols = ("run", "prompt tokens", "prefill + 1 token (s)", "decode (tok/s)", "vs transformers (prefill / decode)",
            "peak RSS (anon / file)", "estimate (weights + kernel buffers + request)", "within it")  # fmt: skip
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
        peak = f"{gb(r['peak_rss'])} ({gb(r['peak_anon'])} / {gb(r['peak_file'])})"
        rows.append([name, r["prompt_tokens"], f"{r['prefill_s']:.1f}", f"{r['decode_tps']:.2f}", vs, peak,
                     gb(r["estimate"]), "yes" if within else "no"])  # fmt: skip
    print(text_table(cols, rows))
    what = (f"PaliGemma 2 3B at 448 and 896 px, full-size synthetic bfloat16 checkpoints; {THREADS} threads; greedy; "
            f"{args.tokens} decoded tokens; ours with this machine's kernels (bench/common.py `machine_kernels`): "
            + "; ".join(f"{n}: {k}" for n, k in plans.items() if k) + ".")  # fmt: skip
    doc = header("High resolutions", command("bench.high_res", argv), what)
    doc += [*md_table(cols, rows), "", "## Targets", "", *md_table(("target", "this run", "verdict"), targets)]
    write("high_res", doc)


if __name__ == "__main__":
    main()
