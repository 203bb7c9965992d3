"""Generation speed on full-size PaliGemma-3B and PaliGemma 2 3B, ours against transformers `generate` and against
the machine's ceilings measured in the same run.

    python -m bench.generate_speed [--only ours-bf16,hf-bf16] [--checkpoint DIR]

Every configuration runs in its own fresh process (bench/supervise.py) with the same prompt (256 image tokens +
BOS + 3 text tokens + newline), the same threads, greedy decoding, one warm-up, then the median of 3 repeats of
one 33-token generation, each token's arrival timed (ours as `generate` yields it, transformers' by its streamer):
- prefill = time to the first token (image encoding + prefill + first token);
- decode  = the 32 tokens after it: 32 / (last arrival - first arrival);
- GB/s    = the weight bytes a decode step reads (decoder + the tied table for the logits) x tokens/s, beside the
  machine's DRAM read rate measured in the row's own process just before and just after its timed generations
  (bench/kernels.py `dram_read_rate`; their mean is the row's ceiling: this VM's rate was seen to move by half
  within minutes, so one figure for the whole run compared rows against a rate they did not see). The parent's
  rate before and after all the rows is reported too;
- GFLOP/s = the linear layers' multiply-adds of the prefill (2 x weights x tokens, vision tower and decoder) over
  the prefill time, beside the machine's bfloat16 and float32 GEMM rates (bench/kernels.py `gemm_rates`: a
  16-bit prefill may run either, "upcast" widens to float32 where that is faster);
- RSS     = sampled around the timed generations, beside the RSS right after loading.
Ours runs with the kernels measured on this machine (kernels.py; `info` shows them) unless a row names others:
`ours-bf16-reference` is the ablation, the same model with the reference kernels (`kernels="reference"`, the
documented load option). Writes docs/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import bench_prompt, ensure_checkpoint, hf_token_times, token_times
from bench.kernels import dram_read_rate, gemm_rates
from bench.report import ROOT, command, gb, header, md_table, set_threads, text_table, verdict, write
from bench.supervise import protect_the_machine, run_child

NEW_TOKENS = 32
BF16_GEMM, FP32_GEMM = "bfloat16 GEMM", "float32 GEMM"  # bench/kernels.py gemm_rates' names
REPEATS = 3
THREADS = 2
# name -> (implementation, dtype, quantize, kernels, source checkpoint, what it is)
RUNS = {
    "ours-bf16": ("ours", "bfloat16", None, None, "bf16", "the 16-bit default: bf16 weights, measured kernels"),
    "ours-pg2-bf16": ("ours", "bfloat16", None, None, "pg2-bf16", "PaliGemma 2 3B, bf16 weights, measured kernels"),
    "ours-pg2-int8": ("ours", "bfloat16", "int8", None, "pg2-bf16", "PaliGemma 2 3B, --quantize int8"),
    "ours-pg2-int4": ("ours", "bfloat16", "int4", None, "pg2-bf16", "PaliGemma 2 3B, --quantize int4"),
    "hf-pg2-bf16": ("hf", "bfloat16", None, None, "pg2-bf16", "PaliGemma 2 3B, transformers generate"),
    "ours-bf16-reference": ("ours", "bfloat16", None, "reference", "bf16", "ablation: reference kernels (F.linear)"),
    "ours-int8": ("ours", "bfloat16", "int8", None, "bf16", "--quantize int8, measured kernels"),
    "ours-int4": ("ours", "bfloat16", "int4", None, "bf16", "--quantize int4, measured kernels"),
    "ours-fp16": ("ours", "float16", None, None, "bf16", "fp16 weights, measured kernels"),
    "hf-bf16": ("hf", "bfloat16", None, None, "bf16", "transformers generate"),
    "hf-fp16": ("hf", "float16", None, None, "bf16", "transformers generate"),
    "hf-fp32": ("hf", "float32", None, None, "fp32", "transformers generate"),
}
DEFAULT_RUNS = (
    "ours-bf16",
    "ours-bf16-reference",
    "ours-int8",
    "ours-int4",
    "hf-bf16",
    "ours-pg2-bf16",
    "ours-pg2-int8",
    "ours-pg2-int4",
    "hf-pg2-bf16",
)
PRESETS = {"bf16": ("bf16", "paligemma-3b-224"), "fp32": ("fp32", "paligemma-3b-224"),
           "pg2-bf16": ("bf16", "paligemma2-3b-224")}  # a run's source -> (checkpoint dtype, preset)  # fmt: skip


def decode_read_bytes(model) -> int:
    """Bytes one decode step reads: every decoder weight and the tied table (logits); not the vision tower."""
    lm = model.language_model.model if hasattr(model, "language_model") else model.model.language_model
    return sum(p.nbytes for p in lm.parameters())


def prefill_flops(cfg, tokens: int) -> int:
    """Multiply-adds x 2 of the prefill's linear layers: the vision tower on its patches, the decoder on the prompt
    (its last layer's queries, output and MLP on one token; the logits on one). Attention's own products aside."""
    v, t = cfg.vision, cfg.text
    vision = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    vision = vision * cfg.num_image_tokens + v.hidden_size * cfg.projection_dim * cfg.num_image_tokens
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    decoder = t.num_hidden_layers * (attn + mlp) * tokens
    return 2 * (vision + decoder + t.vocab_size * t.hidden_size)


def child(name: str, path: Path, out: Path) -> None:
    protect_the_machine()
    import torch

    from lowmem_paligemma.model.config import load_config
    from lowmem_paligemma.profiling.profiler import MemoryProfiler, current_rss

    impl, dtype_name, quantize, kernels, _, _ = RUNS[name]
    set_threads(THREADS)
    dtype = getattr(torch, dtype_name)
    ids, pixels = bench_prompt(load_config(path))
    t0 = time.perf_counter()
    if impl == "ours":
        from lowmem_paligemma import generate, load_model

        loaded = load_model(path, dtype=dtype, quantize=quantize, kernels=kernels)
        model, plan = loaded.model, loaded.kernels.lines()

        def run(n: int) -> tuple[list[float], list[int]]:
            return token_times(generate(model, ids, pixel_values=pixels, max_new_tokens=n,
                                   eos_token_ids=[]))  # fmt: skip
    else:
        from transformers import PaliGemmaForConditionalGeneration

        model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        inputs = {"input_ids": ids, "pixel_values": pixels.to(dtype), "token_type_ids": torch.zeros_like(ids),
                  "attention_mask": torch.ones_like(ids)}  # fmt: skip
        plan = []

        def run(n: int) -> tuple[list[float], list[int]]:
            return hf_token_times(model, n, **inputs)

    load_s = time.perf_counter() - t0
    loaded = current_rss()
    drams = [dram_read_rate()]  # this row's own ceiling, before and after its timings: the VM's rate drifts
    run(2)  # warm-up: first-call allocations, oneDNN primitive creation
    short, long = [], []
    with MemoryProfiler(interval=0.02) as prof:
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            times, tokens = run(1 + NEW_TOKENS)
            short.append(times[0] - t0)
            long.append(times[-1] - times[0])
    prefill_s = statistics.median(short)
    peak = prof.peak()
    drams.append(dram_read_rate())  # after the profiler: its 2 GB buffer is not the row's peak
    result = {
        "name": name, "load_s": load_s, "prefill_s": prefill_s,
        "decode_tps": NEW_TOKENS / statistics.median(long), "read_bytes": decode_read_bytes(model),
        "loaded_rss": loaded["rss"], "peak_rss": peak.rss, "peak_anon": peak.anon, "peak_file": peak.file,
        "tokens": tokens, "kernels": plan, "flops": prefill_flops(load_config(path), ids.shape[1]),
        "dram": statistics.mean(drams), "drams": drams,
    }  # fmt: skip
    out.write_text(json.dumps(result))


def _reference(name: str) -> str:
    return "hf-pg2-bf16" if "pg2" in name else "hf-bf16"


def table(results: list[dict], gemm: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    by = {r["name"]: r for r in results if "error" not in r}
    cols = ("run", "weights", "prefill + 1 token (s)", "decode (tok/s)", "prefill vs transformers",
            "decode vs transformers", "DRAM read before / after the row (GB/s)", "decode GB/s (of their mean)",
            "prefill GFLOP/s (of bf16 / fp32 GEMM)", "RSS loaded", "peak RSS generating (anon / file)")  # fmt: skip
    rows = []
    for r in results:
        _, dtype, quantize, _, kind, _ = RUNS[r["name"]]
        what = f"{quantize or dtype} (from {kind})"
        if "error" in r:
            rows.append([r["name"], what, r["error"], *["-"] * 8])
            continue
        hf = by.get(_reference(r["name"]))
        rate = r["read_bytes"] * r["decode_tps"]
        flops = r["flops"] / r["prefill_s"]
        vp = f"{r['prefill_s'] / hf['prefill_s']:.2f}x" if hf else "-"
        vd = f"{r['decode_tps'] / hf['decode_tps']:.2f}x" if hf else "-"
        peak = f"{gb(r['peak_rss'])} ({gb(r['peak_anon'])} / {gb(r['peak_file'])})"
        rows.append([r["name"], what, f"{r['prefill_s']:.2f}", f"{r['decode_tps']:.2f}", vp, vd,
                     " / ".join(f"{d / 1e9:.1f}" for d in r["drams"]), f"{rate / 1e9:.1f} ({rate / r['dram']:.0%})",
                     f"{flops / 1e9:.0f} ({flops / gemm[BF16_GEMM]:.0%} / {flops / gemm[FP32_GEMM]:.0%})",
                     gb(r["loaded_rss"]), peak])  # fmt: skip
    return list(cols), rows


def targets(results: list[dict], gemm: dict[str, float]) -> list[str]:
    """The issue's targets, as far as this run measures them (docs/performance.md says which are met and why)."""
    by = {r["name"]: r for r in results if "error" not in r}
    rows = []
    for name in (n for n in by if n.startswith("ours") and "reference" not in n):
        share = by[name]["read_bytes"] * by[name]["decode_tps"] / by[name]["dram"]
        rows.append([f"{name} decode >= 85% of the DRAM read rate (its row's)", f"{share:.0%}", verdict(share >= 0.85)])
    for prefix in ("ours-", "ours-pg2-"):
        base = by.get(f"{prefix}bf16")
        if not base:
            continue
        for fmt, limit in (("int8", 0.75), ("int4", 1.0)):
            if (q := by.get(f"{prefix}{fmt}")) is not None:
                ratio = q["prefill_s"] / base["prefill_s"]
                rows.append(
                    [f"{prefix}{fmt} prefill <= {limit}x {prefix}bf16's", f"{ratio:.2f}x", verdict(ratio <= limit)]
                )
        share = base["flops"] / base["prefill_s"] / gemm[BF16_GEMM]
        rows.append([f"{prefix}bf16 prefill >= 80% of the bfloat16 GEMM rate", f"{share:.0%}", verdict(share >= 0.8)])
        share = base["flops"] / base["prefill_s"] / gemm[FP32_GEMM]
        rows.append(["... of the float32 GEMM rate (what upcast runs; no target)", f"{share:.0%}", "-"])
    return md_table(("target", "this run", "verdict"), rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated runs: " + ", ".join(RUNS))
    p.add_argument("--checkpoint", type=Path, help="one checkpoint for every row (e.g. a tiny one, to try the bench)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.checkpoint, args.out)
        return
    names = args.only.split(",") if args.only else list(DEFAULT_RUNS)
    if unknown := [n for n in names if n not in RUNS]:
        p.error(f"unknown run(s): {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    cmd = command("bench.generate_speed", argv)
    set_threads(THREADS)
    dram_before, gemm = dram_read_rate(), gemm_rates()
    out_dir = ROOT / "out" / "generate_speed"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        path = args.checkpoint or ensure_checkpoint(*PRESETS[RUNS[name][4]])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        c = run_child("bench.generate_speed", ["--child", name, "--checkpoint", str(path)], out_dir / f"{name}.json",
                      out_dir / f"{name}.log", timeout_s=1800)  # fmt: skip
        results.append(c.result if c.status == "ok" else {"name": name, "error": f"{c.status} {c.note}"})
        r = results[-1]
        print("  " + (r.get("error") or f"prefill {r['prefill_s']:.2f} s, decode {r['decode_tps']:.2f} tok/s"),
              file=sys.stderr)  # fmt: skip
    dram_after = dram_read_rate()
    dram = (dram_before + dram_after) / 2
    cols, rows = table(results, gemm)
    print(text_table(cols, rows))
    what = (
        f"Checkpoints: full-size synthetic PaliGemma-3B-224 and PaliGemma 2 3B-224 in bfloat16 (bench/common.py) "
        f"unless `--checkpoint`; {THREADS} threads; greedy; {NEW_TOKENS} decoded tokens; median of {REPEATS} after a "
        f"warm-up; each row in a fresh process. Ceilings measured in this run: DRAM read {dram / 1e9:.1f} GB/s (before "
        f"the rows {dram_before / 1e9:.1f}, after {dram_after / 1e9:.1f}), GEMM (256 x 2048 @ 2048 x 16384) bfloat16 "
        f"{gemm[BF16_GEMM] / 1e9:.0f}, float32 {gemm[FP32_GEMM] / 1e9:.0f} GFLOP/s."
    )
    lines = header("Generation speed: ours against transformers", cmd, what)
    lines += [
        *md_table(cols, rows),
        "",
        "## Targets",
        "",
        *targets(results, gemm),
        "",
        "## Kernels each of our rows used",
        "",
    ]
    lines += [
        f"- {r['name']}: " + "; ".join(r.get("kernels") or ["-"]) for r in results if r["name"].startswith("ours")
    ]
    lines += ["", "## First greedy tokens (random weights: equal ids across dtypes are not expected)", ""]
    lines += [f"- {r['name']}: {r['tokens'][:10]}" for r in results if "tokens" in r]
    write("speed", lines)


if __name__ == "__main__":
    main()
