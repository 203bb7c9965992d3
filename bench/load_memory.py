"""`make bench`: peak RAM and load time of five ways to load PaliGemma-3B on CPU, side by side in one run.

Strategies (each in its own fresh process, under `MemoryProfiler`, with phase marks):
  naive           the original from-scratch port: model built in float32 with random init, every shard read into
                  one dict with `safetensors.torch.load_file`, `load_state_dict`; stays float32 (as the original)
  fork            the memory-optimized fork's recipe (seed 002) on our model class: meta build, `to_empty` in
                  float32, `param.data = param.data.half()`, then per shard `safe_open` (mmap) + `get_tensor` +
                  `.half()` + `copy_`
  transformers    `transformers.PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=...)`
  ours            `lowmem_paligemma.loader.load_model(path, dtype=...)`
  ours-zero-copy  `load_model(path, dtype=torch.bfloat16, zero_copy=True)`, bf16 checkpoint only
  ours-hf-class   transformers' own `PaliGemmaForConditionalGeneration` filled by our stream
                  (`lowmem_paligemma.loader.load_transformers_model`), fp32 checkpoint -> float16

Every row runs with a cold and with a warm page cache (`--cache`): cold drops the checkpoint's pages before the
run (`posix_fadvise(DONTNEED)`, no root needed), so the load reads the disk, as a first load does; warm reads the
shards once just before the run. On a 24 GB machine the two checkpoints and a 6 GB model do not all fit in the
page cache at once, so an unmanaged cache gives whatever the previous run left behind.

The parent runs the children one after another and never lets one take the machine down: it polls
MemAvailable every 0.1 s and kills a child when it falls under 1 GB ("killed: would exhaust RAM"); `naive`
(~23 GB on the fp32 checkpoint) is started only when MemAvailable covers its estimate plus 1.5 GB. Measurements
are the child's own (`/proc/self/status`); the parent's polling is only the safety net.

Output: a table on stdout, timelines (JSON) and child logs under out/load_memory/, and docs/memory.md with one
PNG timeline per run and one overlay per (cache, checkpoint, target dtype) under docs/memory/.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/load_memory.py` puts bench/, not the repository, on sys.path
    sys.path.insert(0, str(ROOT))

GB = 1e9  # tables in GB (1e9 bytes); the plots are in GiB
STRATEGIES = ("naive", "fork", "transformers", "ours", "ours-zero-copy", "ours-hf-class")
CACHE_MODES = ("cold", "warm")
KILL_BELOW_BYTES = 1_000_000_000  # MemAvailable floor: under it the child is killed
NAIVE_MARGIN_BYTES = 1_500_000_000  # naive runs only if MemAvailable > estimate + this
POLL_S = 0.1
CHILD_TIMEOUT_S = 900
SAMPLE_INTERVAL_S = 0.05
SETTLED, TOUCH = "settled", "touch every weight page"  # phase marks the parent reads back

# The targets, per source checkpoint kind; "anon" is max anon <= final RSS + 0.3 GB (fp32 only).
TARGETS = {
    "fp32": {"peak": 6.3 * GB, "anon_over_final": 0.3 * GB, "time_ratio": 0.25},
    "bf16": {"peak": 6.3 * GB, "anon_over_final": None, "time_ratio": 0.3},
}


# --- the strategies (run in the child) -------------------------------------------------------------------


def _shards(path: Path) -> list[Path]:
    from lowmem_paligemma.loader import checkpoint_files

    return checkpoint_files(path)


def load_naive(path: Path, dtype: Any, mark) -> Any:
    from safetensors.torch import load_file

    from lowmem_paligemma.config import load_config
    from lowmem_paligemma.paligemma import PaliGemmaForConditionalGeneration

    mark("build float32 (random init)")
    model = PaliGemmaForConditionalGeneration(load_config(path))
    state: dict[str, Any] = {}
    files = _shards(path)
    for i, shard in enumerate(files, 1):
        mark(f"load_file {i}/{len(files)}")
        state.update(load_file(shard))
    mark("load_state_dict")
    model.load_state_dict(state, strict=True)
    del state
    return model.eval()


def load_fork(path: Path, dtype: Any, mark) -> Any:
    import torch
    from safetensors import safe_open

    from lowmem_paligemma.config import load_config
    from lowmem_paligemma.paligemma import PaliGemmaForConditionalGeneration

    mark("meta build")
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(load_config(path))
    mark("to_empty float32")
    model = model.to_empty(device="cpu")
    mark("half()")
    for _, param in model.named_parameters():
        param.data = param.data.half()
    state_dict = model.state_dict()
    files = _shards(path)
    with torch.no_grad():
        for i, shard in enumerate(files, 1):
            mark(f"shard {i}/{len(files)}")
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in state_dict:
                        tensor = f.get_tensor(key)
                        if tensor.dtype == torch.float32:
                            tensor = tensor.half()
                        state_dict[key].copy_(tensor)
                        del tensor
    return model.eval()


def load_transformers(path: Path, dtype: Any, mark) -> Any:
    from transformers import PaliGemmaForConditionalGeneration

    mark("from_pretrained")
    return PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def load_ours(path: Path, dtype: Any, mark) -> Any:
    from lowmem_paligemma.loader import load_model

    return load_model(path, dtype=dtype, on_phase=mark)


def load_ours_zero_copy(path: Path, dtype: Any, mark) -> Any:
    from lowmem_paligemma.loader import load_model

    return load_model(path, dtype=dtype, zero_copy=True, on_phase=mark)


def load_ours_hf_class(path: Path, dtype: Any, mark) -> Any:
    from lowmem_paligemma.loader import load_transformers_model

    return load_transformers_model(path, dtype=dtype, on_phase=mark)


LOADERS = {
    "naive": load_naive,
    "fork": load_fork,
    "transformers": load_transformers,
    "ours": load_ours,
    "ours-zero-copy": load_ours_zero_copy,
    "ours-hf-class": load_ours_hf_class,
}


PREIMPORTS = {
    "naive": ["safetensors.torch", "lowmem_paligemma.loader"],
    "fork": ["safetensors", "lowmem_paligemma.loader"],
    "transformers": ["transformers"],
    "ours": ["lowmem_paligemma.loader"],
    "ours-zero-copy": ["lowmem_paligemma.loader"],
    "ours-hf-class": ["transformers", "lowmem_paligemma.loader"],
}


def model_bytes(model: Any) -> int:
    """Bytes of the model's tensors, each storage counted once (a tied head is not counted twice)."""
    seen: dict[tuple[int, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def touch_pages(model: Any) -> None:
    """Read one element per 4 KiB page of every weight, as a first forward would."""
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        flat[:: max(1, 4096 // flat.element_size())].float().sum()


def child(strategy: str, path: Path, dtype_name: str, out: Path) -> None:
    """One load in this (fresh) process; the timeline and its numbers go to `out` as JSON."""
    try:  # if anything must be killed by the kernel, let it be this process, not the machine's others
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    import torch

    from lowmem_paligemma.profiler import MemoryProfiler

    # Import time is not load time, for any strategy: the modules each loader uses come in first. transformers
    # imports its model classes lazily (1.6 s here, torch._dynamo included), so resolve the class too.
    for module in PREIMPORTS[strategy]:
        importlib.import_module(module)
    if strategy == "transformers":
        import transformers

        transformers.PaliGemmaForConditionalGeneration  # noqa: B018 (the attribute access is the import)
    dtype = getattr(torch, dtype_name)
    had_dynamo = "torch._dynamo" in sys.modules
    with MemoryProfiler(interval=SAMPLE_INTERVAL_S) as prof:
        prof.mark("start")
        t0 = time.perf_counter()
        model = LOADERS[strategy](path, dtype, prof.mark)
        seconds = time.perf_counter() - t0
        prof.mark("loaded")
        time.sleep(0.2)  # a few samples of the settled state
        prof.mark(SETTLED)  # the final RSS; the table's load numbers stop here
        # Mapped weights (zero-copy, and transformers when the dtypes match) cost nothing until read: show what
        # the first forward brings in, for every strategy alike.
        with prof.phase(TOUCH):
            touch_pages(model)
    prof.meta.update(
        strategy=strategy,
        checkpoint=str(path),
        dtype=dtype_name,
        load_s=seconds,
        model_bytes=model_bytes(model),
        param_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        # torch imports torch._dynamo (~0.9 s here) the first time some ops run on `meta` (nn.init on an
        # Embedding built there): a cost inside the load, worth naming when a row pays it.
        dynamo_imported_in_load=not had_dynamo and "torch._dynamo" in sys.modules,
        label=f"{strategy}: {path.name} -> {dtype_name}",
    )
    prof.to_json(out)


# --- the parent ------------------------------------------------------------------------------------------


@dataclass
class Run:
    strategy: str
    kind: str  # source checkpoint kind: fp32 / bf16
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
    def group(self) -> tuple[str, str, str]:
        # naive stays float32 (as the original) but is compared with the fp32 -> float16 rows
        return self.cache, self.kind, "float16" if self.strategy == "naive" else self.dtype


ROWS = {
    "fp32": [
        ("naive", "float32"),
        ("fork", "float16"),
        ("transformers", "float16"),
        ("ours", "float16"),
        ("ours-hf-class", "float16"),
        ("transformers", "bfloat16"),
        ("ours", "bfloat16"),
    ],
    "bf16": [
        ("transformers", "float16"),
        ("ours", "float16"),
        ("transformers", "bfloat16"),
        ("ours", "bfloat16"),
        ("ours-zero-copy", "bfloat16"),
    ],
}


def plan_runs(paths: dict[str, Path], only: list[str], caches: list[str]) -> list[Run]:
    return [
        Run(s, kind, path, d, cache)
        for cache in caches
        for kind, path in paths.items()
        for s, d in ROWS[kind]
        if s in only
    ]


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/meminfo")


def mem_available() -> int:
    return _meminfo("MemAvailable")


def naive_estimate(path: Path) -> int:
    """fp32 model (anon, random init) + every shard mapped by load_file (file-backed), both resident at once."""
    from lowmem_paligemma.loader import read_checkpoint

    entries = read_checkpoint(path).values()
    return sum(e.numel for e in entries) * 4 + sum(e.nbytes for e in entries)


def set_page_cache(path: Path, cache: str) -> None:
    """cold: drop the shards' clean pages from the page cache; warm: read every shard once (1 MB buffer)."""
    for shard in _shards(path):
        if cache == "cold":
            fd = os.open(shard, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        else:
            buf = bytearray(1 << 20)
            with open(shard, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def disk_read_speed(path: Path, nbytes: int = 2_000_000_000) -> float:
    """Cold sequential read speed (bytes/s) of the checkpoint's disk: virtual disks vary from minute to minute."""
    shard = max(_shards(path), key=lambda f: f.stat().st_size)
    buf, done = bytearray(1 << 20), 0
    with open(shard, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        while done < nbytes and (n := f.readinto(buf)):
            done += n
        seconds = time.perf_counter() - t0
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return done / seconds


def cached_fraction(path: Path) -> float | None:
    """Share of the checkpoint's bytes in the page cache now (util-linux `fincore`; None without it)."""
    if shutil.which("fincore") is None:
        return None
    files = [str(s) for s in _shards(path)]
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *files], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    res = size = 0
    for line in out.stdout.splitlines():
        r, s = line.split()
        res, size = res + int(r), size + int(s)
    return res / size if size else None


def run_child(run: Run, out_dir: Path) -> None:
    """Start the child and watch it; fills run.status / run.summary."""
    out, log = out_dir / f"{run.name}.json", out_dir / f"{run.name}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", run.strategy, "--checkpoint", str(run.path)]
    cmd += ["--dtype", run.dtype, "--out", str(out)]
    set_page_cache(run.path, run.cache)
    context = {"cached_at_start": cached_fraction(run.path), "loadavg_1m": os.getloadavg()[0]}
    with open(log, "w") as log_f:
        proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, cwd=ROOT)
        t0, low = time.monotonic(), mem_available()
        while proc.poll() is None:
            avail = mem_available()
            low = min(low, avail)
            if avail < KILL_BELOW_BYTES:
                proc.kill()
                proc.wait()
                run.status = "killed: would exhaust RAM"
                run.note = f"MemAvailable fell to {avail / GB:.2f} GB"
                return
            if time.monotonic() - t0 > CHILD_TIMEOUT_S:
                proc.kill()
                proc.wait()
                run.status = f"killed: over {CHILD_TIMEOUT_S} s"
                return
            time.sleep(POLL_S)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        run.status, run.note = f"failed (exit {proc.returncode})", tail[0][:200]
        return
    from lowmem_paligemma.profiler import Timeline

    run.status = "ok"
    run.summary = summarize(Timeline.from_json(out)) | context | {"min_mem_available": low}


def summarize(tl: Any) -> dict[str, Any]:
    """The table's numbers from one timeline: peaks both at the peak-RSS sample and per series."""
    end = next(m.t for m in tl.marks if m.name == SETTLED)
    s = [x for x in tl.samples if x.t <= end]  # the load; the page-touching phase comes after
    top = max(s, key=lambda x: x.rss)
    hwm = max((x.hwm for x in s if x.hwm is not None), default=None)
    return {
        "load_s": tl.meta["load_s"],
        "peak_rss": max(top.rss, hwm or 0),  # VmHWM also catches spikes shorter than the sampling interval
        "sampled_peak_rss": top.rss,
        "anon_at_peak": top.anon,
        "file_at_peak": top.file,
        "max_anon": max((x.anon for x in s if x.anon is not None), default=None),
        "max_file": max((x.file for x in s if x.file is not None), default=None),
        "final_rss": s[-1].rss,
        "final_anon": s[-1].anon,
        "touched_rss": tl.samples[-1].rss,  # after the touch phase
        "touched_file": tl.samples[-1].file,
        "model_bytes": tl.meta["model_bytes"],
        "param_dtypes": tl.meta["param_dtypes"],
        "dynamo_imported_in_load": tl.meta.get("dynamo_imported_in_load", False),
    }


def add_ratios_and_targets(runs: list[Run]) -> None:
    base = {r.group: r.summary["load_s"] for r in runs if r.strategy == "transformers" and r.status == "ok"}
    for r in runs:
        if r.status != "ok":
            continue
        ref = base.get(r.group)
        r.summary["ratio"] = None if ref is None else r.summary["load_s"] / ref
        t, s, checks = TARGETS[r.kind], r.summary, {}
        checks[f"peak <= {t['peak'] / GB:.1f}"] = s["peak_rss"] <= t["peak"]
        if t["anon_over_final"] is not None and s["max_anon"] is not None:
            limit = s["final_rss"] + t["anon_over_final"]
            checks[f"anon <= final+{t['anon_over_final'] / GB:.1f}"] = s["max_anon"] <= limit
        if s["ratio"] is not None:
            checks[f"time <= {t['time_ratio']}x"] = s["ratio"] <= t["time_ratio"]
        s["targets"] = checks


# --- the report ------------------------------------------------------------------------------------------

COLUMNS = (
    "strategy", "checkpoint", "target", "load s", "x transformers", "peak RSS", "anon @peak", "file @peak",
    "max anon", "max file", "final RSS", "after use", "model", "targets (issue)",
)  # fmt: skip


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def table_rows(runs: list[Run], shards: dict[str, int]) -> list[list[str]]:
    rows = []
    for r in runs:
        ckpt = f"{r.kind} ({shards[r.kind]} shards)"
        if r.status != "ok":
            rows.append([r.strategy, ckpt, r.dtype, r.status, *["-"] * (len(COLUMNS) - 5), r.note])
            continue
        s = r.summary
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}"
        checks = ", ".join(f"{k}: {'met' if ok else '**not met**'}" for k, ok in s["targets"].items())
        rows.append(
            [r.strategy, ckpt, r.dtype, f"{s['load_s']:.1f}", ratio, _gb(s["peak_rss"]), _gb(s["anon_at_peak"]),
             _gb(s["file_at_peak"]), _gb(s["max_anon"]), _gb(s["max_file"]), _gb(s["final_rss"]),
             _gb(s["touched_rss"]), _gb(s["model_bytes"]), checks]
        )  # fmt: skip
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def text_table(rows: list[list[str]]) -> str:
    cols = COLUMNS[:-1]  # the targets column is long: printed per row below the table
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*cols)] + [fmt.format(*r[: len(cols)]) for r in rows]
    out += [f"  {r[0]} {r[1]} -> {r[2]}: {r[-1].replace('**', '')}" for r in rows if r[-1]]
    return "\n".join(out)


def machine() -> str:
    from lowmem_paligemma.profiler import total_ram_bytes

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor() or "unknown CPU",
    )  # fmt: skip
    ram = total_ram_bytes() or 0
    swap = _meminfo("SwapTotal")
    swap_text = "no swap" if not swap else f"{swap / GB:.1f} GB swap"
    return f"{os.cpu_count()} cores ({cpu}), {ram / GB:.1f} GB RAM ({ram / 2**30:.1f} GiB), {swap_text}"


def code_version() -> str:
    """The commit measured, and which tracked files differed from it (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        code_only = ["--", ".", ":(exclude)docs"]  # docs/ is what this run writes
        dirty = subprocess.run(
            ["git", "diff", "--name-only", "HEAD", *code_only], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = dirty.stdout.split()
    return head.stdout.strip() + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def versions() -> str:
    import safetensors
    import torch
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}"
    )


def write_plots(runs: list[Run], out_dir: Path, plot_dir: Path) -> list[Path]:
    from lowmem_paligemma.plot import plot_comparison, plot_timeline
    from lowmem_paligemma.profiler import Timeline

    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("*.png"):  # a PNG from an earlier run would outlive its row
        old.unlink()
    paths, groups = [], {}
    for r in runs:
        if r.status != "ok":
            continue
        tl = Timeline.from_json(out_dir / f"{r.name}.json")
        title = f"{r.strategy}: {r.kind} checkpoint -> {r.dtype}, {r.cache} cache ({r.summary['load_s']:.1f} s)"
        paths.append(plot_timeline(tl, plot_dir / f"{r.name}.png", title=title, model_bytes=r.summary["model_bytes"]))
        groups.setdefault(r.group, {})[r.strategy] = tl
    for (cache, kind, dtype), tls in groups.items():
        if len(tls) > 1:
            title = f"{kind} checkpoint -> {dtype}, {cache} page cache"
            paths.append(plot_comparison(tls, plot_dir / f"overlay-{cache}-{kind}-{dtype}.png", title=title))
    return paths


def write_report(report: Path, runs: list[Run], shards: dict[str, int], plots: list[Path], info: dict) -> None:
    rel = [p.relative_to(report.parent) for p in plots]
    overlays = [p for p in rel if p.name.startswith("overlay-")]
    singles = [p for p in rel if not p.name.startswith("overlay-")]
    caches = list(dict.fromkeys(r.cache for r in runs))
    text = f"""# Loading PaliGemma-3B on CPU: peak memory and time

Measured {info["date"]} with `{info["command"]}` on {info["machine"]}.
{info["versions"]}. Code: commit {info["code"]}. Wall time of the whole run: {info["wall"]}.

Checkpoints, {info["what"]}:
{info["checkpoints"]}
Each strategy ran in its own fresh process (`--child`), one after another. Memory is sampled by the child itself
every {SAMPLE_INTERVAL_S * 1000:.0f} ms from `/proc/self/status` (`lowmem_paligemma.profiler`). Load time is from
the call to its return; interpreter start and library imports are not in it (each child imports the modules its
loader uses first, transformers' lazily imported model class included).

**Page cache.** *cold*: the checkpoint's pages were dropped (`posix_fadvise(DONTNEED)`) just before the run, so
the load reads the disk, as a first load does. *warm*: the shards were read once just before the run. The
"cached" line under each table gives the share of the checkpoint in the page cache at the start of each run.
Cold times follow the (virtual) disk, whose speed drifts: a cold sequential read (1 MB reads, one thread) ran at
{info["disk"]} GB/s at the start and the end of this run; compare cold rows within one run only.

All sizes in GB (1e9 bytes). **peak RSS** is the kernel's high-water mark VmHWM (it catches spikes shorter than
the sampling interval; never below the sampled maximum). **anon @peak / file @peak** are the anonymous (heap,
tensors) and file-backed (mmap'd checkpoint pages) parts of the sample with the highest RSS; **max anon / max
file** are the maxima of each series over the load (they need not coincide). **final RSS** is the process after
the load returned, with the model alive. **after use** is the RSS once every weight page has been read (one
element per 4 KiB page, as the first forward does; not in the load time): a load that leaves weights mapped from
the checkpoint (zero-copy; transformers when the checkpoint already has the target dtype) shows its footprint
here, as file-backed pages the kernel may drop and re-read under pressure. **model** is the bytes of the loaded
model's tensors. **x transformers** is load time over transformers' load of the same checkpoint to the same dtype
with the same cache state in this run.

Targets (from the issue), per row from the numbers: fp32 checkpoint -> peak RSS <= 6.3 GB, max anon <= final
RSS + 0.3 GB, time <= 0.25x transformers; bf16 checkpoint -> peak RSS <= 6.3 GB, time <= 0.3x transformers; the
same for both target dtypes. The naive row keeps float32 (as the original port does) and is timed against
transformers' float16 load.
"""
    for cache in caches:
        these = [r for r in runs if r.cache == cache]
        cached = [r.summary.get("cached_at_start") for r in these if r.status == "ok"]
        text += f"\n## {cache.capitalize()} page cache\n\n{markdown_table(table_rows(these, shards))}\n\n"
        text += f"Cached at start: {_pct_range(cached)} of the checkpoint. "
        text += f"1-minute load average before the runs: {_range([r.summary.get('loadavg_1m') for r in these])}.\n"
    notes = []  # not-run and failed rows carry their reason in the table
    for r in runs:
        if r.summary and r.summary["param_dtypes"] != [r.dtype]:
            got = ", ".join(r.summary["param_dtypes"])
            notes.append(f"- {r.strategy} {r.kind} -> {r.dtype} ({r.cache}): the parameters ended up as {got}.")
    paid = sorted({f"{r.strategy} ({r.kind} -> {r.dtype})" for r in runs if r.summary.get("dynamo_imported_in_load")})
    if paid:
        notes.append(
            "- torch imported `torch._dynamo` (about 0.9 s on this machine) inside the load of: "
            + ", ".join(paid)
            + ". It comes with the first `nn.init` call on a `meta` tensor (an `nn.Embedding` built on meta); "
            "transformers' import of its model class already did it, outside its load time."
        )
    if notes:
        text += "\nNotes:\n" + "\n".join(notes) + "\n"
    text += "\n## Plots\n\nOverlays (total RSS solid, anon dashed):\n\n"
    text += "".join(f"![{p.stem}]({p.as_posix()})\n" for p in overlays)
    text += "\nOne timeline per run (RSS, anon, file, VmHWM, phase marks):\n\n"
    text += "".join(f"![{p.stem}]({p.as_posix()})\n" for p in singles)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)


def _range(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{min(present):.1f}-{max(present):.1f}" if present else "-"


def _pct_range(values: list[float | None]) -> str:
    present = [f"{100 * v:.0f}%" for v in values if v is not None]
    if not present:
        return "unknown (no fincore)"
    return present[0] if len(set(present)) == 1 else f"{min(present)}-{max(present)}"


# --- main ------------------------------------------------------------------------------------------------


def checkpoint_paths(kinds: list[str], checkpoint_dir: Path | None) -> dict[str, Path]:
    if checkpoint_dir is not None:
        return {k: checkpoint_dir / k for k in kinds}
    from bench.common import CHECKPOINTS, PRESET, ensure_checkpoint

    paths = {}
    for kind in kinds:
        path = CHECKPOINTS / f"{PRESET}-{kind}"
        # Another session may be writing it right now: wait while it grows rather than write it twice.
        while path.is_dir() and not (path / ".complete").is_file() and _growing(path):
            print(f"waiting for {path} (being written) ...", file=sys.stderr, flush=True)
        paths[kind] = ensure_checkpoint(kind)
    return paths


def _growing(path: Path, seconds: float = 20.0) -> bool:
    def size() -> int:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())

    before = size()
    time.sleep(seconds)
    return size() > before


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in _shards(path))


def _csv(value: str, allowed: tuple[str, ...], what: str, parser: argparse.ArgumentParser) -> list[str]:
    items = [v for v in value.split(",") if v]
    if unknown := set(items) - set(allowed):
        parser.error(f"unknown {what}: {', '.join(sorted(unknown))} (expected some of {', '.join(allowed)})")
    return items


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(STRATEGIES), help="comma-separated strategies (default: all)")
    p.add_argument("--skip-naive", action="store_true", help="do not run (or estimate) the naive original port")
    p.add_argument("--checkpoints", default="fp32,bf16", help="source checkpoints: fp32, bf16 or both")
    p.add_argument("--cache", default="cold,warm", help="page-cache states to run each row in: cold, warm or both")
    p.add_argument("--checkpoint-dir", type=Path, help="use DIR/fp32 and DIR/bf16 (e.g. small synth checkpoints)")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "memory.md", help="markdown report; PNGs beside it")
    p.add_argument("--out-dir", type=Path, default=ROOT / "out" / "load_memory", help="timelines (JSON) and logs")
    p.add_argument("--child", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.checkpoint, args.dtype, args.out)
        return
    only = _csv(args.only, STRATEGIES, "strategies", p)
    if args.skip_naive and "naive" in only:
        only.remove("naive")
    kinds = _csv(args.checkpoints, tuple(TARGETS), "checkpoints", p)
    caches = _csv(args.cache, CACHE_MODES, "cache states", p)

    t_start = time.perf_counter()
    date = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    code = code_version()  # at the start: the code the children will import
    paths = checkpoint_paths(kinds, args.checkpoint_dir)
    shards = {k: len(_shards(path)) for k, path in paths.items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(paths, only, caches)
    probe = next(iter(paths.values()))
    speeds = [disk_read_speed(probe)]
    for i, run in enumerate(runs, 1):
        what = f"{run.strategy}: {run.kind} -> {run.dtype}, {run.cache} cache"
        print(f"[{i}/{len(runs)}] {what} ...", file=sys.stderr, flush=True)
        if run.strategy == "naive":
            need, have = naive_estimate(run.path), mem_available()
            if have < need + NAIVE_MARGIN_BYTES:
                run.note = (
                    f"estimated {need / GB:.1f} GB (fp32 model + mapped shards) + {NAIVE_MARGIN_BYTES / GB:.1f} GB "
                    f"margin, MemAvailable {have / GB:.1f} GB"
                )
                print(f"  not run: {run.note}", file=sys.stderr, flush=True)
                continue
        run_child(run, args.out_dir)
        s = run.summary
        done = f"{s['load_s']:.1f} s, peak {_gb(s['peak_rss'])} GB" if run.status == "ok" else run.note
        print(f"  {run.status}: {done}", file=sys.stderr, flush=True)

    speeds.append(disk_read_speed(probe))
    add_ratios_and_targets(runs)
    for cache in caches:
        print(f"\n{cache} page cache:")
        print(text_table(table_rows([r for r in runs if r.cache == cache], shards)))
    plots = write_plots(runs, args.out_dir, args.report.parent / args.report.stem)
    what = (
        "full-size synthetic PaliGemma-3B-224 (random weights in the Hub's exact layout and sizes, `bench/common.py`)"
        if args.checkpoint_dir is None
        else f"from `--checkpoint-dir {args.checkpoint_dir}`"
    )
    info = {
        "date": date,
        "command": " ".join(["python bench/load_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "versions": versions(),
        "code": code,
        "wall": f"{(time.perf_counter() - t_start) / 60:.1f} min",
        "disk": " and ".join(f"{v / GB:.2f}" for v in speeds),
        "what": what,
        "checkpoints": "".join(
            f"- {k}: `{path}`, {shards[k]} shards, {_checkpoint_bytes(path) / GB:.2f} GB\n" for k, path in paths.items()
        ),
    }
    write_report(args.report, runs, shards, plots, info)
    results = [{"run": r.name, "status": r.status, "note": r.note, **r.summary} for r in runs]
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"report: {args.report}", file=sys.stderr)


if __name__ == "__main__":
    main()
