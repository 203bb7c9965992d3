"""Peak RAM and load time of the ways to load PaliGemma-3B on CPU, side by side in one run (`make bench`).

    python -m bench.load_memory [--only ours,transformers] [--checkpoints fp32,bf16] [--cache cold,warm]

Every strategy of bench/load_strategies.py runs in its own fresh child process (bench/supervise.py), with a
cold and a warm page cache (bench/pagecache.py): cold drops the checkpoint's pages first, as a first load
reads the disk; warm reads the shards once just before. On a 24 GB machine the two checkpoints and a 6 GB
model do not all fit in the page cache at once, so an unmanaged cache gives whatever the previous run left.
`load-state-dict` (~23 GB on the fp32 checkpoint) runs only when MemAvailable covers its estimate + 1.5 GB.
Writes docs/results/memory.md with one PNG timeline per run and one overlay per (cache, checkpoint, dtype)
under docs/results/memory/; timelines (JSON) and child logs under out/load_memory/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import checkpoint_bytes, ensure_checkpoint
from bench.load_strategies import SAMPLE_INTERVAL_S, SETTLED, STRATEGIES
from bench.pagecache import cached_fraction, disk_read_speed, set_page_cache
from bench.report import RESULTS, ROOT, command, gb, header, md_table, mem_available, text_table, verdict, write
from bench.supervise import run_child

CACHE_MODES = ("cold", "warm")
NAIVE_MARGIN_BYTES = 1_500_000_000
# Targets, per source checkpoint: peak RSS, max anon over the final RSS (fp32 only), load time against
# transformers; the quantized rows have their own peak targets.
TARGETS = {
    "fp32": {"peak": 6.3e9, "anon_over_final": 0.3e9, "time_ratio": 0.25},
    "bf16": {"peak": 6.3e9, "anon_over_final": None, "time_ratio": 0.3},
}
QUANT_PEAK = {"ours-int8": 3.6e9, "ours-int4": 2.2e9}
ROWS = {  # (strategy, target dtype) per checkpoint kind
    "fp32": [("load-state-dict", "float32"), ("to-empty-half", "float16"), ("transformers", "float16"),
             ("ours", "float16"), ("ours-hf-class", "float16"), ("transformers", "bfloat16"), ("ours", "bfloat16")],
    "bf16": [("transformers", "float16"), ("ours", "float16"), ("transformers", "bfloat16"), ("ours", "bfloat16"),
             ("ours-zero-copy", "bfloat16"), ("ours-int8", "bfloat16"), ("ours-int4", "bfloat16")],
}  # fmt: skip
COLUMNS = ("strategy", "checkpoint", "target", "load s", "x transformers", "peak RSS", "anon @peak", "file @peak",
           "max anon", "max file", "final RSS", "after use", "model", "targets")  # fmt: skip


@dataclass
class Run:
    strategy: str
    kind: str  # source checkpoint: fp32 / bf16
    path: Path
    dtype: str  # target dtype name
    cache: str  # cold / warm page cache at the start
    status: str = "not run"
    note: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.cache}-{self.kind}-{self.strategy}-{self.dtype}"

    @property
    def group(self) -> tuple[str, str, str]:  # load-state-dict stays float32 but is compared with -> float16
        return self.cache, self.kind, "float16" if self.strategy == "load-state-dict" else self.dtype


def naive_estimate(path: Path) -> int:
    """fp32 model (anon, random init) + every shard mapped by load_file (file-backed), both resident at once."""
    from lowmem_paligemma.checkpoint.safetensors_io import read_checkpoint

    entries = read_checkpoint(path).values()
    return sum(e.numel for e in entries) * 4 + sum(e.nbytes for e in entries)


def summarize(tl: Any) -> dict[str, Any]:
    """The table's numbers from one timeline: peaks both at the peak-RSS sample and per series."""
    end = next(m.t for m in tl.marks if m.name == SETTLED)
    s = [x for x in tl.samples if x.t <= end]  # the load; the page-touching phase comes after
    top = max(s, key=lambda x: x.rss)
    hwm = max((x.hwm for x in s if x.hwm is not None), default=None)
    return {
        "load_s": tl.meta["load_s"],
        "peak_rss": max(top.rss, hwm or 0),  # VmHWM also catches spikes shorter than the sampling interval
        "anon_at_peak": top.anon,
        "file_at_peak": top.file,
        "max_anon": max((x.anon for x in s if x.anon is not None), default=None),
        "max_file": max((x.file for x in s if x.file is not None), default=None),
        "final_rss": s[-1].rss,
        "touched_rss": tl.samples[-1].rss,  # after the touch phase
        "model_bytes": tl.meta["model_bytes"],
        "param_dtypes": tl.meta["param_dtypes"],
        "dynamo_imported_in_load": tl.meta.get("dynamo_imported_in_load", False),
    }


def judge(runs: list[Run]) -> None:
    base = {r.group: r.summary["load_s"] for r in runs if r.strategy == "transformers" and r.status == "ok"}
    for r in runs:
        if r.status != "ok":
            continue
        s, t = r.summary, TARGETS[r.kind]
        s["ratio"] = None if r.group not in base else s["load_s"] / base[r.group]
        peak = QUANT_PEAK.get(r.strategy, t["peak"])
        checks = {f"peak <= {peak / 1e9:.1f}": s["peak_rss"] <= peak}
        if t["anon_over_final"] is not None and r.strategy not in QUANT_PEAK and s["max_anon"] is not None:
            checks[f"anon <= final+{t['anon_over_final'] / 1e9:.1f}"] = s["max_anon"] <= s["final_rss"] + 0.3e9
        if s["ratio"] is not None and r.strategy != "transformers":
            checks[f"time <= {t['time_ratio']}x"] = s["ratio"] <= t["time_ratio"]
        s["targets"] = ", ".join(f"{k}: {verdict(ok)}" for k, ok in checks.items())


def row(r: Run, shards: dict[str, int]) -> list[str]:
    ckpt = f"{r.kind} ({shards[r.kind]} shards)"
    if r.status != "ok":
        return [r.strategy, ckpt, r.dtype, r.status, *["-"] * (len(COLUMNS) - 5), r.note]
    s = r.summary
    ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}"
    return [r.strategy, ckpt, r.dtype, f"{s['load_s']:.1f}", ratio, gb(s["peak_rss"]), gb(s["anon_at_peak"]),
            gb(s["file_at_peak"]), gb(s["max_anon"]), gb(s["max_file"]), gb(s["final_rss"]), gb(s["touched_rss"]),
            gb(s["model_bytes"]), s["targets"]]  # fmt: skip


def write_plots(runs: list[Run], out_dir: Path, plot_dir: Path) -> list[Path]:
    from lowmem_paligemma.profiling.plot import plot_comparison, plot_timeline
    from lowmem_paligemma.profiling.profiler import Timeline

    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("*.png"):  # a PNG from an earlier run would outlive its row
        old.unlink()
    paths, groups = [], {}
    for r in (r for r in runs if r.status == "ok"):
        tl = Timeline.from_json(out_dir / f"{r.name}.json")
        title = f"{r.strategy}: {r.kind} checkpoint -> {r.dtype}, {r.cache} cache ({r.summary['load_s']:.1f} s)"
        paths.append(plot_timeline(tl, plot_dir / f"{r.name}.png", title=title, model_bytes=r.summary["model_bytes"]))
        groups.setdefault(r.group, {})[r.strategy] = tl
    for (cache, kind, dtype), tls in groups.items():
        if len(tls) > 1:
            title = f"{kind} checkpoint -> {dtype}, {cache} page cache"
            paths.append(plot_comparison(tls, plot_dir / f"overlay-{cache}-{kind}-{dtype}.png", title=title))
    return paths


def report(runs: list[Run], paths: dict[str, Path], shards: dict[str, int], plots: list[Path], info: dict) -> None:
    what = (
        "Checkpoints: " + "; ".join(f"{k} `{p}` ({shards[k]} shards, {gb(checkpoint_bytes(p))} GB)" for k, p in
        paths.items()) + f". Cold sequential disk read: {info['disk']} GB/s at the start and end of the run. "
        f"Memory sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms by each child from /proc/self/status."
    )  # fmt: skip
    lines = header("Loading PaliGemma-3B on CPU: peak memory and time", info["command"], what)
    lines += [
        "Columns: load s (the call to its return); x transformers (against transformers' load of the same "
        "checkpoint to the same dtype, same cache state); peak RSS (VmHWM); anon / file @peak (the sample with the "
        "highest RSS); max anon / max file (each series' maximum); final RSS (model alive); after use (once every "
        "weight page was read); model (bytes of its tensors). Targets: fp32 checkpoint peak <= 6.3, max anon <= "
        "final + 0.3, load <= 0.25x transformers; bf16 peak <= 6.3, load <= 0.3x; int8 peak <= 3.6, int4 <= 2.2.",
        "",
    ]
    for cache in dict.fromkeys(r.cache for r in runs):
        these = [r for r in runs if r.cache == cache]
        cached = sorted({f"{100 * r.summary['cached']:.0f}%" for r in these if r.summary.get("cached") is not None})
        lines += [f"## {cache.capitalize()} page cache", "", *md_table(COLUMNS, [row(r, shards) for r in these]), ""]
        lines += [f"Checkpoint share in the page cache at the start of each run: {', '.join(cached) or 'unknown'}.", ""]
    paid = sorted({f"{r.strategy} ({r.kind} -> {r.dtype})" for r in runs if r.summary.get("dynamo_imported_in_load")})
    if paid:
        lines += [f"torch imported `torch._dynamo` inside the load of: {', '.join(paid)}.", ""]
    rel = [p.relative_to(RESULTS) for p in plots]
    lines += ["## Timelines", ""] + [f"![{p.stem}]({p.as_posix()})" for p in sorted(rel, key=lambda p: p.name)]
    write("memory", lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(STRATEGIES), help="comma-separated strategies (default: all)")
    p.add_argument("--checkpoints", default="fp32,bf16", help="source checkpoints: fp32, bf16 or both")
    p.add_argument("--cache", default="cold,warm", help="page-cache states: cold, warm or both")
    p.add_argument("--checkpoint-dir", type=Path, help="use DIR/fp32 and DIR/bf16 instead (e.g. small checkpoints)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "out" / "load_memory", help="timelines and logs")
    args = p.parse_args(argv)
    only, kinds, caches = (args.only.split(","), args.checkpoints.split(","), args.cache.split(","))
    for items, allowed in ((only, STRATEGIES), (kinds, TARGETS), (caches, CACHE_MODES)):
        if unknown := set(items) - set(allowed):
            p.error(f"unknown {', '.join(sorted(unknown))} (expected some of {', '.join(allowed)})")
    t0 = time.perf_counter()
    cmd = command("bench.load_memory", argv)
    paths = {k: args.checkpoint_dir / k if args.checkpoint_dir else ensure_checkpoint(k) for k in kinds}
    from lowmem_paligemma.checkpoint.safetensors_io import checkpoint_files

    shards = {k: len(checkpoint_files(path)) for k, path in paths.items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = [Run(s, k, paths[k], d, c) for c in caches for k in kinds for s, d in ROWS[k] if s in only]
    speeds = [disk_read_speed(next(iter(paths.values())))]
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.strategy}: {run.kind} -> {run.dtype}, {run.cache} cache ...", file=sys.stderr)
        if run.strategy == "load-state-dict" and mem_available() < naive_estimate(run.path) + NAIVE_MARGIN_BYTES:
            run.note = f"estimated {gb(naive_estimate(run.path), 1)} GB + 1.5 GB margin > MemAvailable"
            continue
        set_page_cache(run.path, run.cache)
        cached, load = cached_fraction(run.path), os.getloadavg()[0]
        out, log = args.out_dir / f"{run.name}.json", args.out_dir / f"{run.name}.log"
        child = run_child("bench.load_strategies", ["--strategy", run.strategy, "--checkpoint", str(run.path),
                                                    "--dtype", run.dtype], out, log)  # fmt: skip
        run.status, run.note = child.status, child.note
        if child.status == "ok":
            from lowmem_paligemma.profiling.profiler import Timeline

            run.summary = summarize(Timeline.from_json(out)) | {"cached": cached, "loadavg": load}
            print(f"  {run.summary['load_s']:.1f} s, peak {gb(run.summary['peak_rss'])} GB", file=sys.stderr)
        else:
            print(f"  {run.status} {run.note}", file=sys.stderr)
    speeds.append(disk_read_speed(next(iter(paths.values()))))
    judge(runs)
    for cache in caches:
        print(
            f"\n{cache} page cache:\n"
            + text_table(COLUMNS[:-1], [row(r, shards)[:-1] for r in runs if r.cache == cache])
        )
    plots = write_plots(runs, args.out_dir, RESULTS / "memory")
    info = {"command": cmd, "disk": " and ".join(f"{s / 1e9:.2f}" for s in speeds)}
    report(runs, paths, shards, plots, info)
    results = [{"run": r.name, "status": r.status, "note": r.note, **r.summary} for r in runs]
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"whole run {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
