"""Larger than RAM: generation under a memory budget, the layers that do not fit streamed from disk.

Runs, each in a fresh process with the checkpoint's pages dropped from the page cache first:
  3b-bf16 @ 3 GB     PaliGemma-3B-224, bf16 checkpoint, computed in bf16
  10b-bf16 @ 8 GB    PaliGemma 2 10B-224, bf16 checkpoint, bf16
  10b-int8 @ 6 GB    PaliGemma 2 10B-224, bf16 checkpoint quantized to int8 as it is read (every pass)
each with read-ahead (the default) and without (`prefetch=False`: the ablation), the first one also with
buffered reads whose pages are dropped instead of O_DIRECT (`direct_io=False`: the other read path), and the
fully resident model where it fits in the memory available now, for the tokens to compare.
Measured in each child: peak RSS (the sampled anon / file split and the kernel's high-water mark), the
checkpoint's page-cache residency (mincore, sampled every 0.25 s: the largest and the last reading), the plan
(resident decoder layers, bytes read per token), decode time per token against the disk floor (bytes read
per token / the disk's cold sequential read rate, measured first with O_DIRECT and 4 reads in flight, as the
streamer reads), and how long the model waited for the reader. Greedy decoding of NEW_TOKENS tokens.
Writes docs/results/stream_budget.md (or --report) and the children's JSON under out/stream_budget/.

    python -m bench.stream_budget                                   # the full-size runs (checkpoints written once)
    python -m bench.stream_budget --only 3b-bf16
    python -m bench.stream_budget --checkpoint DIR --budget 600MB [--quantize int8] --report /tmp/r.md  # any
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, ensure_checkpoint
from bench.report import code_version, mem_available, versions

NEW_TOKENS = 8
CACHE_SAMPLE_S = 0.25
FLOOR_TARGET = 1.3  # time per token within this factor of the disk floor
READ_RATE_BYTES = 2_000_000_000  # how much of the largest shard the disk-rate measurement reads
RESIDENT_MARGIN = 2_000_000_000  # a resident comparison run needs the model plus this available


@dataclass(frozen=True)
class Config:
    name: str
    preset: str
    budget: int
    quantize: str | None


CONFIGS = {
    "3b-bf16": Config("3b-bf16", "paligemma-3b-224", 3_000_000_000, None),
    "10b-bf16": Config("10b-bf16", "paligemma2-10b-224", 8_000_000_000, None),
    "10b-int8": Config("10b-int8", "paligemma2-10b-224", 6_000_000_000, "int8"),
}


# --- the child: one load and one generation ----------------------------------------------------------------------


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def child(
    path: Path, budget: int | None, quantize: str | None, prefetch: bool, direct: bool, new_tokens: int, out: Path
) -> None:
    import torch

    from lowmem_paligemma import load_model
    from lowmem_paligemma.budget.memory import request_bytes
    from lowmem_paligemma.checkpoint.pagecache import resident_total
    from lowmem_paligemma.model.config import load_config
    from lowmem_paligemma.model.generate import generate
    from lowmem_paligemma.profiling.profiler import MemoryProfiler, reset_peak

    cfg = load_config(path)
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [cfg.bos_token_id, 100, 200, 108]])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    shards = _shards(path)
    cached: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample_cache() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            cached.append((time.perf_counter() - t0, resident_total(shards) or 0))
            stop.wait(CACHE_SAMPLE_S)

    sampler = threading.Thread(target=sample_cache, daemon=True)
    reset_peak()
    sampler.start()
    with MemoryProfiler(interval=0.05) as prof:
        t0 = time.perf_counter()
        request = request_bytes(cfg, ids.shape[1], new_tokens, torch.bfloat16)
        loaded = load_model(path, dtype=torch.bfloat16, quantize=quantize, max_memory=budget, prefetch=prefetch,
                            request=request, direct_io=None if direct else False)  # fmt: skip
        model, streamer, plan = loaded.model, loaded.streamer, loaded.residency
        load_s = time.perf_counter() - t0
        rate = streamer.read_rate() if streamer else None
        stamps = [time.perf_counter()]
        tokens = []
        for token in generate(model, ids, pixel_values=pixels, max_new_tokens=new_tokens, eos_token_ids=[]):
            tokens.append(token)
            stamps.append(time.perf_counter())
    stop.set()
    sampler.join()
    cached.append((cached[-1][0] if cached else 0.0, resident_total(shards) or 0))
    peak = prof.peak()
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    record: dict[str, Any] = {
        "tokens": tokens,
        "load_s": load_s,
        "prefill_s": stamps[1] - stamps[0],  # image encoding, prefill and the first token
        "token_s": steps,  # each further token
        "peak_rss": peak.rss,
        "peak_anon": peak.anon,
        "peak_file": peak.file,
        "hwm": peak.hwm,
        "cache_max": max(c for _, c in cached),
        "cache_end": cached[-1][1],
        "threads": torch.get_num_threads(),
        "first_read_rate": rate,
    }
    if plan is not None:
        decoder = [u for u in plan.units if u.group == "decoder"]
        record["plan"] = {
            "total": plan.total, "minimum": plan.minimum, "buffers": plan.buffers, "decoder_layers": len(decoder),
            "resident_decoder": sum(u.name not in plan.streamed for u in decoder),
            "read_per_token": plan.read_per_pass("decoder"), "read_per_image": plan.read_per_pass("vision"),
            "lines": plan.describe(rate),
        }  # fmt: skip
    if streamer is not None:
        s = streamer.stats
        record["stream"] = {"bytes_read": s.bytes_read, "read_s": s.read_s, "wait_s": s.wait_s, "misses": s.misses,
                            "layers_read": s.layers_read, "passes": s.passes, "direct": streamer.direct}  # fmt: skip
    out.write_text(json.dumps(record, indent=1) + "\n")


# --- the parent ------------------------------------------------------------------------------------------------


def disk_read_rate(path: Path, nbytes: int = READ_RATE_BYTES, workers: int = 4, piece: int = 16 << 20) -> float:
    """Cold sequential read rate (bytes/s) of the checkpoint's largest shard, read as the streamer reads:
    O_DIRECT (or buffered with the pages dropped), `workers` pieces in flight."""
    from lowmem_paligemma.checkpoint.pagecache import align_down, aligned_empty, drop_file, open_direct, read_direct

    shard = max(_shards(path), key=lambda p: p.stat().st_size)
    size = align_down(min(nbytes, shard.stat().st_size))
    drop_file(shard)
    fd = open_direct(shard)
    direct = fd is not None
    fd = fd if direct else os.open(shard, os.O_RDONLY)
    local = threading.local()

    def read(offset: int) -> None:
        if getattr(local, "buf", None) is None:
            local.buf = aligned_empty(piece)
        out = local.buf[: min(piece, size - offset)]
        if direct:
            read_direct(fd, out, offset, out.numel(), shard)
        else:
            os.preadv(fd, [memoryview(out.numpy())], offset)

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(read, range(0, size, piece)))
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        drop_file(shard)
    return size / seconds


def run_child(
    path: Path, budget: int | None, quantize: str | None, new_tokens: int, out: Path, prefetch=True, direct=True
):
    from lowmem_paligemma.checkpoint.pagecache import drop_file

    for shard in _shards(path):
        drop_file(shard)  # a cold start: what the last run read must not help this one
    args = [sys.executable, "-m", "bench.stream_budget", "--child", "--checkpoint", str(path), "--out", str(out),
            "--new-tokens", str(new_tokens)]  # fmt: skip
    args += ["--budget", str(budget)] if budget else []
    args += ["--quantize", quantize] if quantize else []
    args += [] if prefetch else ["--no-prefetch"]
    args += [] if direct else ["--buffered"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(out.read_text())


def resident_fits(path: Path, quantize: str | None) -> bool:
    import torch

    from lowmem_paligemma.checkpoint.preflight import model_bytes
    from lowmem_paligemma.pretrained.build import build_model

    need = model_bytes(build_model(path, quantize)[0], torch.bfloat16) + RESIDENT_MARGIN
    return mem_available() > need


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def summarize(name: str, budget: int | None, r: dict[str, Any], rate: float, resident: dict | None) -> list[str]:
    if "error" in r:
        return [name, _gb(budget), *["-"] * 12, f"failed: {r['error']}"]
    per_token = statistics.median(r["token_s"]) if r["token_s"] else None
    plan, stream = r.get("plan"), r.get("stream")
    floor = plan["read_per_token"] / rate if plan else None
    ratio = per_token / floor if per_token and floor else None
    waited = stream["wait_s"] / max(1, sum(stream["passes"].values())) if stream else None
    peak = max(r["peak_rss"], r["hwm"] or 0)
    checks = []
    if budget:
        checks.append(f"peak <= budget: {'met' if peak <= budget else '**not met**'}")
    if ratio is not None:
        checks.append(f"within {FLOOR_TARGET}x of the floor: {'met' if ratio <= FLOOR_TARGET else '**not met**'}")
    same = (
        "-" if resident is None or "error" in resident else ("yes" if resident["tokens"] == r["tokens"] else "**no**")
    )
    kept = f"{plan['resident_decoder']}/{plan['decoder_layers']}" if plan else "all"
    return [
        name, _gb(budget), _gb(plan and plan["total"]), _gb(peak), f"{_gb(r['peak_anon'])} / {_gb(r['peak_file'])}",
        f"{_gb(r['cache_max'])} / {_gb(r['cache_end'])}", kept, _gb(plan and plan["read_per_token"]),
        "-" if floor is None else f"{floor:.2f}", "-" if per_token is None else f"{per_token:.2f}",
        "-" if ratio is None else f"{ratio:.2f}", "-" if waited is None else f"{waited:.2f}", f"{r['prefill_s']:.1f}",
        same, ", ".join(checks),
    ]  # fmt: skip


COLUMNS = [
    "run", "budget GB", "planned GB", "peak RSS GB", "anon / file GB", "page cache max / end GB",
    "decoder layers resident", "read per token GB", "disk floor s/token", "s/token", "x floor",
    "waited s/pass", "prefill s", "same tokens as resident", "checks",
]  # fmt: skip


def write_report(
    report: Path, rows: list[list[str]], rate: float, records: dict[str, Any], args: str, new_tokens: int
) -> None:
    from lowmem_paligemma.machine import cpu
    from lowmem_paligemma.profiling.profiler import total_ram_bytes

    lines = [
        "# Streaming under a memory budget: measurements",
        "",
        f"Written by `python -m bench.stream_budget{args}` on {datetime.now().isoformat(timespec='minutes')}, "
        f"code {code_version()}. docs/streaming.md explains the design and the columns.",
        "",
        f"- CPU: {cpu().describe()}; {_gb(total_ram_bytes())} GB RAM",
        f"- {versions()}",
        f"- disk: cold sequential read {rate / 1e9:.2f} GB/s (O_DIRECT, 4 x 16 MB in flight, the checkpoint's "
        "largest shard)",
        f"- greedy decoding of {new_tokens} tokens after a prompt of the image tokens and 4 more; s/token is the "
        "median decode step; the disk floor is the bytes read per token over the disk rate; page cache: the "
        "checkpoint's bytes in it (mincore)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "## The plans, as printed",
        "",
    ]
    for name, r in records.items():
        if "plan" in r:
            lines += [f"`{name}`:", "", "```", *r["plan"]["lines"], "```", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    from lowmem_paligemma.units import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated runs of {', '.join(CONFIGS)}")
    p.add_argument("--checkpoint", type=Path, help="run this checkpoint instead (needs --budget)")
    p.add_argument("--budget", type=parse_size, help="with --checkpoint: the memory budget, e.g. 600MB")
    p.add_argument("--quantize", choices=["int8", "int4"], help="with --checkpoint: quantize as read")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "stream_budget.md")
    p.add_argument("--out-dir", type=Path, default=ROOT / "out" / "stream_budget")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--buffered", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.checkpoint, args.budget, args.quantize, not args.no_prefetch, not args.buffered, args.new_tokens,
              args.out)  # fmt: skip
        return
    if args.checkpoint is not None:
        if args.budget is None:
            p.error("--checkpoint needs --budget")
        runs = [(args.checkpoint.name, args.checkpoint, args.budget, args.quantize)]
    else:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
        runs = [
            (n, ensure_checkpoint("bf16", CONFIGS[n].preset), CONFIGS[n].budget, CONFIGS[n].quantize) for n in names
        ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rate = disk_read_rate(runs[0][1])
    print(f"disk: cold sequential read {rate / 1e9:.2f} GB/s", file=sys.stderr)
    rows, records = [], {}
    for name, path, budget, quantize in runs:
        resident = None
        if resident_fits(path, quantize):
            print(f"{name}: resident", file=sys.stderr, flush=True)
            resident = run_child(path, None, quantize, args.new_tokens, args.out_dir / f"{name}-resident.json")
            records[f"{name} resident"] = resident
        variants = [("", True, True), (" no prefetch", False, True)]
        variants += [(" buffered reads", True, False)] if name == runs[0][0] else []
        for suffix, prefetch, direct in variants:
            label = name + suffix
            print(f"{label}: budget {_gb(budget)} GB", file=sys.stderr, flush=True)
            out = args.out_dir / f"{label.replace(' ', '-')}.json"
            records[label] = run_child(path, budget, quantize, args.new_tokens, out, prefetch, direct)
            rows.append(summarize(label, budget, records[label], rate, resident))
            print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
        if resident is not None:
            rows.append(summarize(f"{name} resident", None, resident, rate, resident))
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    write_report(args.report, rows, rate, records, f" {shown}" if shown else "", args.new_tokens)
    print(f"wrote {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
