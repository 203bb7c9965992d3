"""Memory timeline plots (PNG) from `profiler.Timeline`s.

matplotlib is imported inside the functions, so importing this module costs nothing. Figures are
built with `Figure` and the Agg canvas, not pyplot: headless, and the caller's pyplot backend and
figure list are left alone. Sizes are in GB (10**9 bytes), the one unit convention of the project (units.py).
Reference lines: the final model size (`model_bytes`, else `meta["model_bytes"]`) and the RAM of
the machine the run was recorded on (`ram_bytes`, else `meta["total_ram"]`, else this machine's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..units import GB, format_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lowmem_paligemma.profiling.profiler import Timeline

_FIGSIZE = (12.0, 6.0)  # inches
_DPI = 120
_MARK_FONT = 7.5  # points; shrunk down to _MIN_MARK_FONT when many marks crowd the axis
_MIN_MARK_FONT = 5.0
_OFF_SCALE = 3.0  # a reference line more than this many times above the data is noted, not drawn


def _gb(values: Sequence[int | None]) -> Any:
    import numpy as np

    # None (no RssAnon on macOS) becomes NaN, which matplotlib leaves as a gap.
    return np.array([np.nan if v is None else v / GB for v in values], dtype=float)


def _new_figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _ram_default(timelines: Sequence[Timeline]) -> int | None:
    for tl in timelines:
        if tl.meta.get("total_ram"):
            return int(tl.meta["total_ram"])
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().total


def _model_default(timelines: Sequence[Timeline]) -> int | None:
    for tl in timelines:
        if tl.meta.get("model_bytes"):
            return int(tl.meta["model_bytes"])
    return None


def _reference_lines(ax: Axes, model_bytes: int | None, ram_bytes: int | None, data_max: float) -> None:
    # Labelled in the legend rather than beside the line, where they collided with the peak label.
    top = max(data_max, (model_bytes or 0) / GB)
    for value, label, color, style in ((model_bytes, "model weights", "0.3", "-."), (ram_bytes, "RAM", "black", ":")):
        if value is None:
            continue
        y = value / GB
        if y > _OFF_SCALE * top:
            # A 24 GB line over a 0.5 GB run would flatten the curves onto the axis: only name it.
            ax.plot([], [], " ", label=f"{label} {format_bytes(value)} (off scale)")
            continue
        ax.axhline(y, color=color, linestyle=style, linewidth=1.2, label=f"{label} {format_bytes(value)}")


def _legend(ax: Axes) -> None:
    # Below the axes: a legend inside would sit on the curves somewhere in a long run. Legends fill
    # column by column, so an even row count keeps each run's RSS/anon pair in one column.
    n = len(ax.get_legend_handles_labels()[0])
    rows = 2 * math.ceil(n / 8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=math.ceil(n / rows), fontsize=8, frameon=False)


def _spread(xs: Sequence[float], gap: float) -> list[float]:
    """Label positions in [0, 1], in order, at least `gap` apart and as close to `xs` (sorted) as possible.

    Least-squares placement: with y_i = pos_i - i * gap the constraint becomes y nondecreasing,
    so pos = isotonic_fit(x_i - i * gap) + i * gap (pool adjacent violators), then clipped to the
    axis, which keeps the fit optimal under the bounds. E.g. xs=[0.5, 0.5, 0.5], gap=0.1 ->
    [0.4, 0.5, 0.6].
    """
    n = len(xs)
    # Blocks of (mean, count) of the shifted targets; merge while a block sits below its left neighbour.
    blocks: list[list[float]] = []
    for i, x in enumerate(xs):
        blocks.append([x - i * gap, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            prev = blocks[-1]
            prev[0] = (prev[0] * prev[1] + mean * count) / (prev[1] + count)
            prev[1] += count
    shifted = [mean for mean, count in blocks for _ in range(int(count))]
    hi = max(0.0, 1.0 - (n - 1) * gap)
    return [min(max(y, 0.0), hi) + i * gap for i, y in enumerate(shifted)]


def _draw_marks(ax: Axes, fig: Figure, timeline: Timeline) -> float:
    """Dashed vertical line per mark; labels rotated in a band above the axes, spread so they never overlap,
    with a thin leader from each label to its line. Returns the band height in points (for the title pad)."""
    marks = sorted(timeline.marks, key=lambda m: m.t)
    if not marks:
        return 0.0
    from matplotlib.transforms import blended_transform_factory

    # A rotated label needs about 1.35 line heights of horizontal room: shrink the font to fit them all,
    # and only past the smallest readable size label every k-th mark (the lines all stay).
    px_per_pt = fig.dpi / 72
    axes_px = fig.get_figwidth() * fig.dpi * ax.get_position().width
    font = min(_MARK_FONT, max(_MIN_MARK_FONT, axes_px / len(marks) / (1.35 * px_per_pt)))
    gap_px = 1.35 * font * px_per_pt
    step = math.ceil(len(marks) * gap_px / axes_px)
    labelled = marks[::step]
    for i, m in enumerate(marks):
        # Unlabelled lines (only when thinning) fainter, so hundreds of marks read as a texture.
        ax.axvline(m.t, color="0.55", linestyle="--", linewidth=0.7, alpha=1.0 if i % step == 0 else 0.25, zorder=1)

    x0, x1 = ax.get_xlim()
    targets = [(m.t - x0) / (x1 - x0) for m in labelled]
    positions = _spread(targets, gap_px / axes_px)
    leader = blended_transform_factory(ax.transData, ax.transAxes)
    for m, pos in zip(labelled, positions, strict=True):
        # Leader from the top of the mark's line to the foot of its label.
        ax.annotate(
            m.name,
            xy=(m.t, 1.0),
            xycoords=leader,
            xytext=(pos, 1.04),
            textcoords="axes fraction",
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=font,
            color="0.25",
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 0},
        )
    longest = max(len(m.name) for m in labelled)
    return 0.04 * ax.get_position().height * fig.get_figheight() * 72 + 0.62 * font * longest + 8


def _finish(fig: Figure, ax: Axes, path: str | os.PathLike[str], title: str, title_pad: float) -> Path:
    ax.set_xlabel("time since profiler start (s)")
    ax.set_ylabel("resident memory (GB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, pad=6 + title_pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # bbox_inches="tight" grows the canvas to hold the mark labels above the axes.
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_timeline(
    timeline: Timeline,
    path: str | os.PathLike[str],
    title: str | None = None,
    model_bytes: int | None = None,
    ram_bytes: int | None = None,
) -> Path:
    """One run: total RSS, anon, file (and VmHWM, CUDA when present) over time, with phase marks."""
    fig, ax = _new_figure()
    s = timeline.samples
    t = [x.t for x in s]
    ax.plot(t, _gb([x.rss for x in s]), color="tab:blue", linewidth=1.8, label="RSS total")
    if any(x.anon is not None for x in s):
        ax.plot(t, _gb([x.anon for x in s]), color="tab:red", linewidth=1.2, label="anon (heap, tensors)")
        ax.plot(t, _gb([x.file for x in s]), color="tab:orange", linewidth=1.2, label="file (mapped pages)")
    if any(x.hwm is not None for x in s):
        # The kernel's high-water mark: shows any spike shorter than the sampling interval.
        ax.step(
            t,
            _gb([x.hwm for x in s]),
            where="post",
            color="tab:blue",
            alpha=0.35,
            linewidth=0.9,
            linestyle="-.",
            label="VmHWM (kernel peak)",
        )
    if any(x.cuda_alloc is not None for x in s):
        ax.plot(t, _gb([x.cuda_alloc for x in s]), color="tab:purple", linewidth=1.2, label="CUDA allocated")
    data_max = 0.0
    if s:
        peak = timeline.peak()
        data_max = max(peak.rss, peak.hwm or 0, peak.cuda_alloc or 0) / GB
        # Label on the side with room, so it does not run off the right edge.
        right = peak.t > 0.75 * t[-1]
        ax.plot([peak.t], [peak.rss / GB], "o", color="tab:blue", markersize=5)
        ax.annotate(
            f"peak {format_bytes(peak.rss)}",
            (peak.t, peak.rss / GB),
            xytext=(-6 if right else 6, 4),
            textcoords="offset points",
            ha="right" if right else "left",
            fontsize=8,
            color="tab:blue",
        )
    model_bytes = model_bytes or _model_default([timeline])
    _reference_lines(ax, model_bytes, ram_bytes or _ram_default([timeline]), data_max)
    _legend(ax)
    ax.set_ylim(bottom=0)  # before the marks: their leaders are placed in axes fraction
    ax.set_xlim(left=0, right=max(t[-1], 1e-3) if t else 1.0)
    pad = _draw_marks(ax, fig, timeline)
    return _finish(fig, ax, path, title or timeline.meta.get("label") or "memory timeline", pad)


def plot_comparison(
    timelines: dict[str, Timeline],
    path: str | os.PathLike[str],
    title: str | None = None,
    model_bytes: int | None = None,
    ram_bytes: int | None = None,
) -> Path:
    """Several runs on one time axis: total RSS solid, anon dashed in the same colour; peaks in the legend."""
    import matplotlib

    fig, ax = _new_figure()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, tl) in enumerate(timelines.items()):
        color = colors[i % len(colors)]
        t = [x.t for x in tl.samples]
        peak = tl.peak()
        ax.plot(
            t,
            _gb([x.rss for x in tl.samples]),
            color=color,
            linewidth=1.8,
            label=f"{name}: RSS (peak {format_bytes(peak.rss)})",
        )
        if peak.anon is not None:
            ax.plot(
                t,
                _gb([x.anon for x in tl.samples]),
                color=color,
                linewidth=1.1,
                linestyle="--",
                label=f"{name}: anon (peak {format_bytes(peak.anon)})",
            )
    runs = list(timelines.values())
    data_max = max((tl.peak().rss for tl in runs), default=0) / GB
    _reference_lines(ax, model_bytes or _model_default(runs), ram_bytes or _ram_default(runs), data_max)
    _legend(ax)
    ax.set_xlim(left=0)
    return _finish(fig, ax, path, title or "memory: " + " vs ".join(timelines), 0.0)
