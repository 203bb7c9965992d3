"""What the commands print on stderr: load, speed and memory lines, the detection list, the profile summary,
progress bars, and the one-line `Error:` for failures a user can cause.

One rule for every progress bar: drawn only when stderr is a terminal (a log file would fill with bar
lines). One unit convention: decimal GB / MB (units.py), the same as the plots and the documents.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..errors import LowmemError
from ..profiling.profiler import Peak, Timeline
from ..runtime.session import Generation, Session
from ..units import format_bytes

PROFILE_PHASES = ("load", "encode", "prefill", "decode")  # the marks `profile` writes, in order


def show_progress() -> bool:
    return sys.stderr.isatty()


@contextmanager
def user_errors() -> Iterator[None]:
    """Expected failures become one `Error: ...` line and exit code 1; anything else keeps its traceback.

    OSError counts as expected: a file the user named that cannot be read or written.
    """
    try:
        yield
    except (LowmemError, OSError) as e:
        message = str(e).strip().splitlines()
        raise click.ClickException(message[0] if message else type(e).__name__) from None


@contextmanager
def byte_progress(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr driven by the writers' `progress(bytes_done, bytes_total)` callback."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False, disable=not show_progress()) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def echo_text(piece: str) -> None:
    click.echo(piece, nl=False)  # click.echo flushes: tokens appear as they are generated


def load_line(session: Session) -> str:
    quantize = session.loaded.quantize  # the option, or how the checkpoint is stored
    what = session.dtype + (f", {quantize}" if quantize else "")
    return (
        f"loaded {format_bytes(session.weight_bytes)} of weights ({what} on {session.device}) in {session.load_s:.2f} s"
    )


def plan_lines(session: Session) -> list[str]:
    """Under a memory budget: the residency plan, with the disk rate of the first layer read (residency.py)."""
    loaded = session.loaded
    if loaded.residency is None:
        return []
    return loaded.residency.describe(loaded.streamer.read_rate() if loaded.streamer else None)


def stream_line(session: Session) -> str | None:
    """What streaming cost so far: bytes read, the reader's rate, how long the model waited for it."""
    if session.loaded.streamer is None:
        return None
    s = session.loaded.streamer.stats
    rate = f" ({format_bytes(s.bytes_read / s.read_s)}/s)" if s.read_s > 0 else ""
    return (
        f"streamed {s.layers_read} layer reads, {format_bytes(s.bytes_read)} in {s.read_s:.2f} s{rate}; "
        f"the model waited {s.wait_s:.2f} s for them"
    )


def speed_line(gen: Generation) -> str:
    rate = gen.tokens_per_s
    decode = f"{rate:.1f} tokens/s" if rate is not None else "-"
    return (
        f"prefill {gen.prefill_s:.3f} s ({gen.prompt_tokens} prompt tokens); "
        f"{len(gen.token_ids)} tokens generated, decode {decode}"
    )


def memory_line(peak: Peak) -> str:
    # hwm is the kernel's own peak (catches what sampling misses); anon / file are the sampled peaks of each part.
    anon, file = format_bytes(peak.anon), format_bytes(peak.file)
    return f"peak RSS {format_bytes(peak.hwm or peak.rss)} (anon {anon}, file {file})"


def detections_report(found: list[dict[str, Any]], path: Path, has_vae: bool) -> list[str]:
    if not found:
        return [
            f"0 objects drawn: the answer held no complete box (four <loc> tokens, then a label), so {path} is "
            "an unchanged copy of the image"
        ]
    lines = [f"{len(found)} object(s) drawn on {path} (boxes x0, y0, x1, y1 in pixels):"]
    for d in found:
        lines.append(f"  {d['label'] or '(no label)'}: {tuple(d['box'])}" + (" + mask" if d["mask"] else ""))
    if not has_vae and any(d["seg"] for d in found):
        lines.append("segmentation codes found: pass --vae vae-oid.npz to draw the masks")
    return lines


def profile_summary(gen: Generation, session: Session, timeline: Timeline, files: list[Path]) -> list[str]:
    at_mark = {s.t: s.rss for s in timeline.samples}
    done = {m.name: at_mark.get(m.t) for m in timeline.marks}
    after = ", ".join(f"{p} {format_bytes(done[f'{p} done'])}" for p in PROFILE_PHASES if f"{p} done" in done)
    return [
        f"output   : {gen.text}",
        f"load     : {session.load_s:.2f} s, {format_bytes(session.weight_bytes)} of {session.dtype} weights",
        f"generate : {speed_line(gen)}",
        f"memory   : {memory_line(timeline.peak())}",
        f"RSS after: {after}",
        f"wrote    : {', '.join(map(str, files))}",
    ]
