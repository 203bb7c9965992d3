"""Load speed: PaliGemma-3B's bfloat16 checkpoint from the page cache and from the disk, against the machine's rates.

    python -m bench.load_speed [--checkpoint DIR]

Each load runs in a fresh process (bench/supervise.py) with its kernel plan given (`--kernels`, what the chooser
picks on this machine, decided before the loads by bench/common.py `machine_kernels`: a load that times kernels
first measures the chooser, not the load), and reports its
wall time, the bytes loaded, GB/s and its peak RSS (anon / file):
- warm: the checkpoint read into the page cache first; `load_model(dtype=bfloat16)` (preads into the parameters),
  the same with the plan of a load for one request (`requests=1`, what the CLI's generate loads with),
  `--zero-copy` (the shards mapped), `--quantize int8` and `int4` (quantized as read), and the same checkpoint
  converted once with `convert --quantize int8` (read as stored);
- cold: the checkpoint's pages dropped first; the disk's own rate is a cold sequential read of the largest shard
  (4 reads in flight, as the loader keeps), measured before the loads;
- the page cache's own rate, measured before the loads in a fresh process: every shard preadv'd from the page
  cache into one fresh buffer the size of the checkpoint (huge pages asked for, as the loader does; 16 MB reads,
  2 threads), and again into the same buffer now touched: the first is the floor of a load into new memory, the
  second the copy alone.
Writes docs/results/load_speed.md. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import ROOT, checkpoint_bytes, ensure_checkpoint, machine_kernels
from bench.kernels import cold_read
from bench.pagecache import set_page_cache
from bench.report import command, gb, header, md_table, set_threads, text_table, verdict, write
from bench.supervise import protect_the_machine, run_child

THREADS = 2
REPEATS = 3
ONE = "warm bf16, one request (generate's plan)"
# name -> (cache, load options, which checkpoint)
RUNS = {
    "warm bf16": ("warm", {}, "bf16"),
    "warm bf16, one request (generate's plan)": ("warm", {"requests": 1}, "bf16"),
    "warm bf16 --zero-copy": ("warm", {"zero_copy": True}, "bf16"),
    "warm --quantize int8": ("warm", {"quantize": "int8"}, "bf16"),
    "warm --quantize int4": ("warm", {"quantize": "int4"}, "bf16"),
    "warm pre-quantized int8": ("warm", {}, "int8-stored"),
    "cold bf16": ("cold", {}, "bf16"),
}


def child(name: str, path: Path, kernels: str, out: Path) -> None:
    protect_the_machine()
    import torch

    from lowmem_paligemma import load_model
    from lowmem_paligemma.profiling.profiler import MemoryProfiler

    set_threads(THREADS)
    cache, options, _ = RUNS[name]
    set_page_cache(path, cache)
    with MemoryProfiler(interval=0.02) as prof:
        t0 = time.perf_counter()
        loaded = load_model(path, dtype=torch.bfloat16, kernels=kernels, **options)
        seconds = time.perf_counter() - t0
    peak = prof.peak()
    out.write_text(json.dumps({"seconds": seconds, "weight_bytes": loaded.weight_bytes, "file_bytes":
                               checkpoint_bytes(path), "peak_rss": peak.hwm or peak.rss, "peak_anon": peak.anon,
                               "peak_file": peak.file}))  # fmt: skip


def page_cache_read(path: Path, out: Path) -> None:
    """Child: seconds to preadv every shard of `path` (in the page cache) into a fresh buffer, then into the
    same buffer again (touched); 16 MB reads over THREADS threads."""
    protect_the_machine()
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from lowmem_paligemma.checkpoint.pagecache import prefer_huge_pages
    from lowmem_paligemma.checkpoint.safetensors_io import checkpoint_files

    set_page_cache(path, "warm")
    chunk = 16 << 20
    jobs, total = [], 0  # (fd, file offset, buffer offset, bytes)
    for shard in checkpoint_files(path):
        fd, size = os.open(shard, os.O_RDONLY), shard.stat().st_size
        jobs += [(fd, off, total + off, min(chunk, size - off)) for off in range(0, size, chunk)]
        total += size
    buf = torch.empty(total, dtype=torch.uint8)
    prefer_huge_pages(buf)
    view = memoryview(buf.numpy())

    def read(k: int) -> None:
        for fd, off, at, n in jobs[k::THREADS]:
            done = 0
            while done < n:
                done += os.preadv(fd, [view[at + done : at + n]], off + done)

    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(read, range(THREADS)))
        seconds.append(time.perf_counter() - t0)
    out.write_text(json.dumps({"bytes": total, "fresh_s": seconds[0], "touched_s": seconds[1]}))


def converted(source: Path) -> Path:
    """The bf16 checkpoint converted once with `convert --quantize int8` (kept beside it)."""
    from lowmem_paligemma.pretrained.convert import convert_checkpoint

    dst = source.parent / f"{source.name}-int8-stored"
    if not (dst / "config.json").is_file():
        convert_checkpoint(source, dst, dtype="bfloat16", quantize="int8")
    return dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="a bf16 checkpoint (default: the full-size PaliGemma-3B)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--kernels", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "page-cache":
        page_cache_read(args.checkpoint, args.out)
        return
    if args.child:
        child(args.child, args.checkpoint, args.kernels, args.out)
        return
    set_threads(THREADS)
    source = args.checkpoint or ensure_checkpoint("bf16")
    paths = {"bf16": source, "int8-stored": converted(source)}
    plans = {name: machine_kernels(paths[which], options.get("quantize"), options.get("zero_copy", False),
                                   options.get("requests"))
             for name, (_, options, which) in RUNS.items()}  # fmt: skip
    shard = max(source.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    disk = statistics.median(shard.stat().st_size / cold_read(shard, 4) for _ in range(REPEATS))
    out_dir = ROOT / "out" / "load_speed"
    out_dir.mkdir(parents=True, exist_ok=True)
    reads = []
    for k in range(REPEATS):
        c = run_child("bench.load_speed", ["--child", "page-cache", "--checkpoint", str(source)],
                      out_dir / f"read{k}.json", out_dir / f"read{k}.log", timeout_s=600)  # fmt: skip
        if c.status != "ok":
            raise SystemExit(f"page-cache read: {c.status} {c.note}")
        reads.append(c.result)
    fresh = statistics.median(r["bytes"] / r["fresh_s"] for r in reads)
    touched = statistics.median(r["bytes"] / r["touched_s"] for r in reads)
    rows, results = [], {}
    for name, (_, _, which) in RUNS.items():
        runs = []
        for k in range(REPEATS):
            args_ = ["--child", name, "--checkpoint", str(paths[which]), "--kernels", plans[name]]
            c = run_child("bench.load_speed", args_,
                          out_dir / f"{k}.json", out_dir / f"{k}.log", timeout_s=900)  # fmt: skip
            if c.status != "ok":
                raise SystemExit(f"{name}: {c.status} {c.note}")
            runs.append(c.result)
        r = sorted(runs, key=lambda x: x["seconds"])[REPEATS // 2]  # the median run
        results[name] = r | {"all_s": [x["seconds"] for x in runs]}
        rate = r["file_bytes"] / r["seconds"]
        rows.append([name, f"{r['seconds']:.2f} ({', '.join(f'{s:.2f}' for s in results[name]['all_s'])})",
                     gb(r["file_bytes"]), f"{rate / 1e9:.2f}", f"{gb(r['peak_rss'])} ({gb(r['peak_anon'])} / "
                     f"{gb(r['peak_file'])})"])  # fmt: skip
        print(rows[-1], file=sys.stderr)
    warm, cold = results["warm bf16"]["seconds"], results["cold bf16"]["seconds"]
    q8 = results["warm --quantize int8"]["seconds"]
    targets = [
        ["16-bit load from the page cache <= 2 s", f"{warm:.2f} s", verdict(warm <= 2.0)],
        ["... with the plan of a load for one request (the CLI's generate)",
         f"{results[ONE]['seconds']:.2f} s", verdict(results[ONE]["seconds"] <= 2.0)],
        ["... mapped (--zero-copy)", f"{results['warm bf16 --zero-copy']['seconds']:.2f} s",
         verdict(results["warm bf16 --zero-copy"]["seconds"] <= 2.0)],
        ["16-bit load against the page cache's own rate into fresh memory (same run)",
         f"{warm * fresh / results['warm bf16']['file_bytes']:.2f}x the read", "-"],
        ["quantize-at-load (int8) <= 2x the 16-bit load", f"{q8 / warm:.2f}x", verdict(q8 <= 2 * warm)],
        ["cold load <= 1.2x the disk's rate", f"{cold * disk / results['cold bf16']['file_bytes']:.2f}x",
         verdict(cold <= 1.2 * results["cold bf16"]["file_bytes"] / disk)],
    ]  # fmt: skip
    cols = ("load", "seconds (median; runs)", "checkpoint bytes", "GB/s of the file", "peak RSS (anon / file)")
    print(text_table(cols, rows))
    kernels = "; ".join(f"{name}: {plan}" for name, plan in plans.items())
    what = (f"{source.name} (bfloat16 {gb(checkpoint_bytes(source))}) loaded as bfloat16 with this machine's "
            f"kernels ({kernels}); "
            f"{THREADS} threads; each load in a fresh process, median of {REPEATS}; the disk reads "
            f"{disk / 1e9:.2f} GB/s cold (largest shard, 4 reads in flight, median of {REPEATS}); the page cache "
            f"reads {fresh / 1e9:.2f} GB/s into fresh memory, {touched / 1e9:.2f} GB/s into touched memory (the "
            f"whole checkpoint, {THREADS} threads, median of {REPEATS}).")  # fmt: skip
    doc = header("Load speed", command("bench.load_speed", argv), what)
    doc += [*md_table(cols, rows), "", "## Targets", "", *md_table(("target", "this run", "verdict"), targets)]
    write("load_speed", doc)


if __name__ == "__main__":
    main()
