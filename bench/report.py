"""One writer for every benchmark document: the header that names the machine and the code, tables, the file.

Generated documents under docs/results/ carry measurements only: what ran (command, date, commit), on what
(CPU model and the flags that decide kernel speed, cores, threads, RAM, library versions), and the numbers.
What the numbers mean is written by hand in docs/performance.md, against a named run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    return _meminfo("MemAvailable")


def machine() -> str:
    """'AMD EPYC, 2 cores, flags: avx2 ...; 2 torch threads; 24.6 GB RAM, no swap'."""
    import torch

    from lowmem_paligemma.machine import cpu
    from lowmem_paligemma.profiling.profiler import total_ram_bytes

    swap = _meminfo("SwapTotal")
    ram = (total_ram_bytes() or 0) / 1e9
    return (
        f"{cpu().describe()}; {torch.get_num_threads()} torch threads; {ram:.1f} GB RAM, "
        f"{'no swap' if not swap else f'{swap / 1e9:.1f} GB swap'}"
    )


def versions() -> str:
    import safetensors
    import torch
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}"
    )


def code_version() -> str:
    """The commit measured, and which tracked files outside docs/ differed from it; or the commit named by
    LOWMEM_BENCH_COMMIT (a lent GPU machine runs a copy of the working tree, whose git state need not be current)."""
    if os.environ.get("LOWMEM_BENCH_COMMIT"):
        return f"{os.environ['LOWMEM_BENCH_COMMIT']} (named by LOWMEM_BENCH_COMMIT: a copy of that checkout)"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "diff", "--name-only", "HEAD", "--", ".", ":(exclude)docs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = dirty.stdout.split()
    return head.stdout.strip() + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def command(module: str, argv: Sequence[str] | None = None) -> str:
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def header(title: str, cmd: str, what: str) -> list[str]:
    """The opening of a results document: title, when, the command, the machine, the code, what was measured."""
    when = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [
        f"# {title}",
        "",
        f"Measured {when} with `{cmd}`.",
        "",
        f"- Machine: {machine()}.",
        f"- Software: {versions()}; code at commit {code_version()}.",
        f"- {what}",
        "",
        "Sizes in GB (1e9 bytes). Generated: interpretation is in docs/performance.md.",
        "",
    ]


def md_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def text_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns), *(fmt.format(*r) for r in cells)])


def gb(n: float | None, digits: int = 2) -> str:
    return "-" if n is None else f"{n / 1e9:.{digits}f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def write(name: str, lines: Sequence[str]) -> Path:
    """docs/results/<name>.md; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return path


def set_threads(n: int) -> None:
    """The thread count every benchmark child uses (documented in each header via `machine()`)."""
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
