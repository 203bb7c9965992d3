"""`make bench` (second half): generation speed, ours vs transformers `generate`, on full-size PaliGemma-3B.

Every configuration runs in its own fresh process (so RSS is its own) with the same prompt (256 image
tokens + BOS + 3 text tokens + "\\n"), the same thread count, greedy decoding, after one warm-up, and
reports medians of 3 repetitions (timings on this shared VM swing from run to run):
- prefill = wall time of a 1-token generation (image encoding + prefill + first token);
- decode  = 32 more tokens: 32 / (time of a 33-token generation - time of the 1-token one);
- RSS     = sampled by MemoryProfiler around the timed generations, beside the RSS right after loading.
Writes docs/speed.md with the table, the date and the command.

    python bench/generate_speed.py                 # all rows
    python bench/generate_speed.py --only ours-bf16,hf-bf16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, ensure_checkpoint, gb  # noqa: E402

NEW_TOKENS = 32
REPEATS = 3
THREADS = 2
# name -> (implementation, stored dtype, checkpoint kind, what it tests)
RUNS = {
    "ours-bf16": ("ours", "bfloat16", "bf16", "bf16 weights; one-token matvec fast path"),
    "ours-bf16-no-mv": ("ours-no-mv", "bfloat16", "bf16", "ablation: F.linear for one-token steps"),
    "ours-fp16": ("ours", "float16", "bf16", "fp16 weights (the card's dtype), compute as measured"),
    "ours-fp32": ("ours", "float32", "fp32", "fp32 weights (reference)"),
    "hf-bf16": ("hf", "bfloat16", "bf16", "transformers 5.x generate"),
    "hf-fp16": ("hf", "float16", "bf16", "transformers 5.x generate"),
    "hf-fp32": ("hf", "float32", "fp32", "transformers 5.x generate"),
}
DEFAULT_RUNS = ("ours-bf16", "ours-bf16-no-mv", "ours-fp16", "hf-bf16", "hf-fp16", "hf-fp32")


def _prompt(cfg):
    ids = [cfg.image_token_index] * cfg.num_image_tokens + [cfg.bos_token_id, 1000, 2000, 3000, 108]
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    return torch.tensor([ids]), pixels


def _child(name: str, path: Path, out: Path) -> None:
    from lowmem_paligemma.config import load_config
    from lowmem_paligemma.profiler import MemoryProfiler, current_rss

    impl, dtype_name, _, _ = RUNS[name]
    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(THREADS)
    cfg = load_config(path)
    ids, pixels = _prompt(cfg)
    t0 = time.perf_counter()
    if impl.startswith("ours"):
        from lowmem_paligemma import gemma, ops
        from lowmem_paligemma.generate import generate
        from lowmem_paligemma.loader import load_model

        if impl == "ours-no-mv":  # the ablation: every projection through F.linear
            ops.linear = gemma.linear = torch.nn.functional.linear
        model = load_model(path, dtype=dtype)

        def run(n: int) -> list[int]:
            return list(generate(model, ids, pixel_values=pixels, max_new_tokens=n, eos_token_ids=[]))
    else:
        from transformers import PaliGemmaForConditionalGeneration

        model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        types, mask = torch.zeros_like(ids), torch.ones_like(ids)

        def run(n: int) -> list[int]:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, pixel_values=pixels.to(dtype), token_type_ids=types, attention_mask=mask,
                    max_new_tokens=n, min_new_tokens=n, do_sample=False,
                )  # fmt: skip
            return out[0, ids.shape[1] :].tolist()

    load_s = time.perf_counter() - t0
    loaded = current_rss()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    run(2)  # warm-up: first-call allocations, oneDNN primitive creation
    short, long = [], []
    with MemoryProfiler(interval=0.02) as prof:
        for _ in range(REPEATS):  # this VM's timings swing run to run (shared host): report medians
            t0 = time.perf_counter()
            first = run(1)
            t1 = time.perf_counter()
            tokens = run(1 + NEW_TOKENS)
            short.append(t1 - t0)
            long.append(time.perf_counter() - t1)
    prefill_s = statistics.median(short)
    decode_tps = NEW_TOKENS / (statistics.median(long) - prefill_s)
    peak = prof.peak()
    result = {
        "name": name, "load_s": load_s, "prefill_s": prefill_s, "decode_tps": decode_tps,
        "model_bytes": model_bytes, "loaded_rss": loaded["rss"], "peak_rss": peak.rss, "peak_anon": peak.anon,
        "peak_file": peak.file, "tokens": tokens, "first": first,
    }  # fmt: skip
    out.write_text(json.dumps(result))


def _run_child(name: str, path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", name, "--checkpoint", str(path), "--out", str(out)]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0 or not out.is_file():
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            return {"name": name, "error": f"exit {proc.returncode}: {tail[0]}"}
        return json.loads(out.read_text())


def _table(results: list[dict]) -> list[str]:
    by = {r["name"]: r for r in results}
    hf = by.get("hf-bf16", {})
    rows = [
        "| run | weights | prefill + 1 token (s) | decode (tok/s) | vs hf-bf16 prefill | vs hf-bf16 decode "
        "| RSS after load (GB) | peak RSS during generation (GB) | anon / file (GB) | model (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        _, dtype_name, kind, what = RUNS[r["name"]]
        if "error" in r:
            rows.append(f"| {r['name']} | {dtype_name} | {r['error']} | | | | | | | |")
            continue
        vp = f"{r['prefill_s'] / hf['prefill_s']:.2f}x" if "prefill_s" in hf else "-"
        vd = f"{r['decode_tps'] / hf['decode_tps']:.2f}x" if "decode_tps" in hf else "-"
        rows.append(
            f"| {r['name']} | {dtype_name} (from {kind} file) | {r['prefill_s']:.2f} | {r['decode_tps']:.2f} | {vp} "
            f"| {vd} | {gb(r['loaded_rss'])} | {gb(r['peak_rss'])} | {gb(r['peak_anon'])} / {gb(r['peak_file'])} "
            f"| {gb(r['model_bytes'])} |"
        )
    return rows


def _targets(results: list[dict]) -> list[str]:
    """The issue's targets, judged from this run's numbers."""
    by = {r["name"]: r for r in results if "error" not in r}
    ours, hf, fp16 = by.get("ours-bf16"), by.get("hf-bf16"), by.get("ours-fp16")
    if not ours or not hf:
        return ["(targets need the ours-bf16 and hf-bf16 rows)"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = [
        "| target | this run | verdict |",
        "|---|---|---|",
        f"| decode >= 8 tok/s with 16-bit weights | {ours['decode_tps']:.2f} tok/s "
        f"| {verdict(ours['decode_tps'] >= 8)} |",
        f"| decode >= 1.6x transformers bf16 | {ours['decode_tps'] / hf['decode_tps']:.2f}x "
        f"| {verdict(ours['decode_tps'] >= 1.6 * hf['decode_tps'])} |",
        f"| prefill <= 0.8x transformers bf16 | {ours['prefill_s'] / hf['prefill_s']:.2f}x "
        f"| {verdict(ours['prefill_s'] <= 0.8 * hf['prefill_s'])} |",
    ]
    if fp16:
        lines.append(
            f"| --dtype float16 prefill <= transformers bf16 | {fp16['prefill_s']:.2f} s vs {hf['prefill_s']:.2f} s "
            f"| {verdict(fp16['prefill_s'] <= hf['prefill_s'])} |"
        )
    for r in (ours, fp16):
        if r:
            grow = r["peak_rss"] - r["loaded_rss"]
            ok = verdict(grow <= 0.5e9)
            lines.append(f"| RSS during generation <= loaded + 0.5 GB ({r['name']}) | +{gb(grow)} GB | {ok} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated run names: " + ", ".join(RUNS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print the table only, leave docs/speed.md alone")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.checkpoint, args.out)
        return
    names = args.only.split(",") if args.only else list(DEFAULT_RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s): {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    results = []
    for name in names:
        path = ensure_checkpoint(RUNS[name][2])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(_run_child(name, path))
        r = results[-1]
        print("  " + (r.get("error") or f"prefill {r['prefill_s']:.2f} s, decode {r['decode_tps']:.2f} tok/s"),
              file=sys.stderr, flush=True)  # fmt: skip
    table = _table(results)
    print("\n".join(table))
    if args.no_write:
        return
    command = "python bench/generate_speed.py" + (f" --only {args.only}" if args.only else "")
    same = {r["name"]: r["tokens"] for r in results if "tokens" in r}
    lines = [
        "# Generation speed",
        "",
        f"Measured {dt.date.today().isoformat()} with `{command}` (`make bench` runs it) on this machine: "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{THREADS} threads. Full-size synthetic PaliGemma-3B-224 (random weights in the Hub layout, "
        "`bench/common.py`); prompt = 256 image tokens + BOS + 3 text tokens + newline; greedy; "
        f"{NEW_TOKENS} decoded tokens; one warm-up, then the median of {REPEATS} timed repetitions; each row in a "
        "fresh process.",
        "",
        *table,
        "",
        "## Targets (from the issue), judged from the table",
        "",
        *_targets(results),
        "",
        "## Why the numbers are where they are",
        "",
        "- Decode streams every weight once per token: 5.05 GB in 16 bits (decoder + tied embedding for the",
        "  logits). Its ceiling is the DRAM read rate of `bench/kernels.py` (docs/kernels.md) divided by that.",
        "  `torch.mv` for one-token bfloat16 products reads at that rate; `ours-bf16-no-mv` is the same model",
        "  with `F.linear`, the difference being the fast path. Decoding cannot beat the ceiling with 16-bit",
        "  weights, so the 8 tok/s target would need more bandwidth than this machine has.",
        "- Prefill is the same bfloat16 GEMMs (AMX, oneDNN) for both implementations. Ours skips the logits of",
        "  every position but the last, and uses SDPA where there is no soft-cap.",
        "- float16 weights on this CPU: float16 GEMMs and float16->bfloat16 conversions are both several times",
        "  slower than bfloat16 GEMMs (docs/kernels.md), so no compute dtype makes stored float16 as fast as",
        "  bfloat16. The CLI defaults to bfloat16 on CPU: same memory, fastest compute.",
        "",
        "Greedy token ids of each run (same prompt; ties between near-equal random logits may differ by dtype):",
        "",
        *[f"- {k}: {v[:12]}..." for k, v in same.items()],
        "",
    ]
    (ROOT / "docs" / "speed.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {ROOT / 'docs' / 'speed.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
