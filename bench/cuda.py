"""PaliGemma on a CUDA GPU, where one is lent: the GPU tests, then full-size loads and generation, ours against
transformers on the same GPU, beside the GPU's own ceilings measured in the same run.

    python -m bench.cuda [--only ours-bf16,hf-bf16] [--no-tests]

1. `pytest tests/pretrained/test_load_cuda.py` (parity with transformers and with the CPU on tiny checkpoints):
   its summary line goes into the document.
2. Ceilings: a device-to-device copy of 4 GB (bytes read + written per second) and an 8192^3 bfloat16 matrix
   product (CUDA events, mean of 10 after 3 warm-ups, random data).
3. Rows, each in a fresh process (bench/supervise.py), on the full-size synthetic checkpoints (bench/common.py,
   written on the machine when missing, so read from the page cache):
   - load: seconds to a model on the GPU; the host's peak RSS while loading (anon / file) beside its RSS with the
     CUDA context made and nothing loaded: the host holds a few read chunks, never the model; the GPU memory
     allocated at its peak while loading and after, beside the weights' bytes;
   - generation as bench/generate_speed.py: the same prompt (256 image tokens + 5), greedy, one warm-up, median
     of 3 generations of 33 tokens: prefill + first token, decode tok/s over the 32 after it, decode GB/s (the
     weight bytes one step reads x tok/s) beside the copy rate, and the GPU's peak allocation while generating.
Writes docs/results/cuda.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import bench_prompt, ensure_checkpoint, hf_token_times, token_times
from bench.generate_speed import decode_read_bytes, prefill_flops
from bench.report import ROOT, command, gb, header, md_table, text_table, write
from bench.supervise import protect_the_machine, run_child

NEW_TOKENS = 32
REPEATS = 3
TESTS = "tests/pretrained/test_load_cuda.py"
# name -> (implementation, quantize, source checkpoint (PRESETS), what it is)
RUNS = {
    "ours-bf16": ("ours", None, "bf16", "PaliGemma-3B, bf16 weights"),
    "ours-int8": ("ours", "int8", "bf16", "PaliGemma-3B, --quantize int8 (dequantized per layer on the GPU)"),
    "ours-int4": ("ours", "int4", "bf16", "PaliGemma-3B, --quantize int4 (dequantized per layer on the GPU)"),
    "hf-bf16": ("hf", None, "bf16", "PaliGemma-3B, transformers from_pretrained(device_map='cuda') + generate"),
    "ours-pg2-bf16": ("ours", None, "pg2-bf16", "PaliGemma 2 3B, bf16 weights"),
    "hf-pg2-bf16": ("hf", None, "pg2-bf16", "PaliGemma 2 3B, transformers"),
    "ours-pg2-10b-bf16": ("ours", None, "pg2-10b-bf16", "PaliGemma 2 10B, bf16 weights"),
    "hf-pg2-10b-bf16": ("hf", None, "pg2-10b-bf16", "PaliGemma 2 10B, transformers"),
}
PRESETS = {"bf16": ("bf16", "paligemma-3b-224"), "pg2-bf16": ("bf16", "paligemma2-3b-224"),
           "pg2-10b-bf16": ("bf16", "paligemma2-10b-224")}  # fmt: skip


def ceilings() -> dict[str, float]:
    """{'copy GB/s': device-to-device bytes read + written per second, 'bf16 TFLOP/s': an 8192^3 product}."""
    import torch

    def timed(fn, warm: int = 3, reps: int = 10) -> float:
        for _ in range(warm):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    def copy_rate() -> float:
        src = torch.randn(1 << 30, device="cuda")  # 4 GB of float32, many times the L2
        dst = torch.empty_like(src)
        return 2 * src.nbytes / timed(lambda: dst.copy_(src))

    def gemm_rate(n: int = 8192) -> float:
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return 2 * n**3 / timed(lambda: a @ b)

    return {"copy GB/s": copy_rate() / 1e9, "bf16 TFLOP/s": gemm_rate() / 1e12}


def child(name: str, path: Path, out: Path) -> None:
    protect_the_machine()
    import torch

    from lowmem_paligemma.model.config import load_config
    from lowmem_paligemma.profiling.profiler import MemoryProfiler, current_rss

    impl, quantize, _, _ = RUNS[name]
    torch.zeros(1, device="cuda")  # the CUDA context, made before the baseline
    base = current_rss()
    ids, pixels = bench_prompt(load_config(path))
    torch.cuda.reset_peak_memory_stats()
    with MemoryProfiler(interval=0.01) as prof:
        t0 = time.perf_counter()
        if impl == "ours":
            from lowmem_paligemma import generate, load_model

            loaded = load_model(path, dtype=torch.bfloat16, quantize=quantize, device="cuda")
            model, plan = loaded.model, loaded.kernels.lines()
        else:
            # transformers' own PyTorch modules: with the `kernels` package installed it would fetch CUDA kernels
            # from the Hub at load, which needs the network (a GPU machine here has none).
            os.environ["USE_HUB_KERNELS"] = "NO"
            from transformers import PaliGemmaForConditionalGeneration

            model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
            model, plan = model.eval(), []
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
    load_peak = prof.peak()
    load_gpu_peak, load_gpu = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    weights = sum(p.nbytes for p in model.parameters())
    if impl == "ours":

        def run(n: int) -> tuple[list[float], list[int]]:
            return token_times(generate(model, ids, pixel_values=pixels, max_new_tokens=n, eos_token_ids=[]))
    else:
        inputs = {"input_ids": ids, "pixel_values": pixels.to(torch.bfloat16), "token_type_ids": torch.zeros_like(ids),
                  "attention_mask": torch.ones_like(ids)}  # fmt: skip
        inputs = {k: v.cuda() for k, v in inputs.items()}

        def run(n: int) -> tuple[list[float], list[int]]:
            return hf_token_times(model, n, **inputs)

    run(2)  # warm-up: cuBLAS handles, first-call allocations
    torch.cuda.reset_peak_memory_stats()
    short, long = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        times, tokens = run(1 + NEW_TOKENS)  # each token is read back to the host (a sync) as it arrives
        short.append(times[0] - t0)
        long.append(times[-1] - times[0])
    result = {
        "name": name, "load_s": load_s, "base_rss": base["rss"], "load_rss": load_peak.rss,
        "load_anon": load_peak.anon, "load_file": load_peak.file, "load_gpu_peak": load_gpu_peak,
        "load_gpu": load_gpu, "weights": weights, "gen_gpu_peak": torch.cuda.max_memory_allocated(),
        "prefill_s": statistics.median(short), "decode_tps": NEW_TOKENS / statistics.median(long),
        "read_bytes": decode_read_bytes(model), "flops": prefill_flops(load_config(path), ids.shape[1]),
        "tokens": tokens, "kernels": plan,
    }  # fmt: skip
    out.write_text(json.dumps(result))


def gpu_tests() -> str:
    """Runs the GPU tests; their pytest summary line (e.g. '14 passed in 30.1s')."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else f"pytest exit {proc.returncode}, no output"


def table(results: list[dict], ceiling: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    by = {r["name"]: r for r in results if "error" not in r}
    cols = ("run", "load (s)", "host RSS: CUDA context / peak loading (anon / file)", "GPU: weights / peak loading / "
            "after", "prefill + 1 token (s)", "decode (tok/s)", "decode vs transformers", "decode GB/s (of the copy "
            "rate)", "prefill TFLOP/s", "GPU peak generating")  # fmt: skip
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], r["error"], *["-"] * (len(cols) - 2)])
            continue
        source = RUNS[r["name"]][2]  # transformers' row on the same checkpoint
        hf = next((by[n] for n in by if RUNS[n][0] == "hf" and RUNS[n][2] == source), None)
        rate = r["read_bytes"] * r["decode_tps"]
        rows.append([
            r["name"], f"{r['load_s']:.2f}", f"{gb(r['base_rss'])} / {gb(r['load_rss'])} "
            f"({gb(r['load_anon'])} / {gb(r['load_file'])})",
            f"{gb(r['weights'])} / {gb(r['load_gpu_peak'])} / {gb(r['load_gpu'])}", f"{r['prefill_s']:.3f}",
            f"{r['decode_tps']:.1f}", f"{r['decode_tps'] / hf['decode_tps']:.2f}x" if hf else "-",
            f"{rate / 1e9:.0f} ({rate / 1e9 / ceiling['copy GB/s']:.0%})",
            f"{r['flops'] / r['prefill_s'] / 1e12:.1f}", gb(r["gen_gpu_peak"]),
        ])  # fmt: skip
    return list(cols), rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated runs: " + ", ".join(RUNS))
    p.add_argument("--no-tests", action="store_true", help="skip the GPU tests")
    p.add_argument("--checkpoint", type=Path, help="one checkpoint for every row (e.g. a tiny one, to try the bench)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.checkpoint, args.out)
        return
    names = args.only.split(",") if args.only else list(RUNS)
    if unknown := [n for n in names if n not in RUNS]:
        p.error(f"unknown run(s): {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("Error: bench.cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    cmd = command("bench.cuda", argv)
    gpu = f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} GB"
    tests = "not run (--no-tests)" if args.no_tests else gpu_tests()
    print(f"GPU tests: {tests}", file=sys.stderr, flush=True)
    ceiling = ceilings()
    print(f"ceilings: {ceiling}", file=sys.stderr, flush=True)
    out_dir = ROOT / "out" / "cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        path = args.checkpoint or ensure_checkpoint(*PRESETS[RUNS[name][2]])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        c = run_child("bench.cuda", ["--child", name, "--checkpoint", str(path)], out_dir / f"{name}.json",
                      out_dir / f"{name}.log", timeout_s=600)  # fmt: skip
        results.append(c.result if c.status == "ok" else {"name": name, "error": f"{c.status} {c.note}"})
        r = results[-1]
        print("  " + (r.get("error") or f"load {r['load_s']:.1f} s, prefill {r['prefill_s']:.3f} s, decode "
                      f"{r['decode_tps']:.1f} tok/s"), file=sys.stderr, flush=True)  # fmt: skip
        document(cmd, gpu, tests, ceiling, results)  # after every row: a run stopped early keeps what it measured
    print(text_table(*table(results, ceiling)))


def document(cmd: str, gpu: str, tests: str, ceiling: dict[str, float], results: list[dict]) -> None:
    import torch

    cols, rows = table(results, ceiling)
    what = (
        f"GPU: {gpu}; CUDA {torch.version.cuda}. GPU tests (`pytest {TESTS}`): {tests}. Ceilings measured in this "
        f"run: device-to-device copy {ceiling['copy GB/s']:.0f} GB/s (read + written), bfloat16 matrix product "
        f"{ceiling['bf16 TFLOP/s']:.0f} TFLOP/s. Checkpoints: full-size synthetic, bfloat16 (bench/common.py) "
        f"unless `--checkpoint`; greedy; {NEW_TOKENS} decoded tokens; median of {REPEATS} after a warm-up; each "
        "row in a fresh process, compute in bfloat16."
    )
    lines = header("PaliGemma on a CUDA GPU: ours against transformers", cmd, what)
    lines += [*md_table(cols, rows), "", "## Rows", ""]
    lines += [f"- {r['name']}: {RUNS[r['name']][3]}" for r in results]
    lines += ["", "## Kernels each of our rows used", ""]
    lines += [f"- {r['name']}: " + "; ".join(r.get("kernels") or ["-"]) for r in results if r["name"].startswith("o")]
    lines += ["", "## First greedy tokens", ""]
    lines += [f"- {r['name']}: {r['tokens'][:10]}" for r in results if "tokens" in r]
    write("cuda", lines)


if __name__ == "__main__":
    main()
