"""The commands that run the model: generate, chat, profile, batch. Each is a few lines over runtime/session.py.

Results go to stdout (streamed tokens, JSON, paths written); diagnostics go to stderr (cli/report.py).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TextIO

import click
import torch
from click.core import ParameterSource

from ..errors import ContextLengthError, ImageError, PromptError
from ..model.processor import check_prompt, load_image, to_rgb
from ..model.sampling import SamplingOptions
from ..model.tasks import VQVAEDecoder
from ..pretrained.options import LoadOptions
from ..profiling.plot import plot_timeline
from ..profiling.profiler import MemoryProfiler
from ..runtime.batch import BatchJob, list_image_paths, plan_run, run_batch
from ..runtime.draw import check_draw, draw_output
from ..runtime.ray_batch import connect, run_ray_batch, worker_resources
from ..runtime.session import Generation, Session, load_session, run_prompt
from .options import (
    EXISTING_FILE,
    MODEL_DIR,
    NEW_DIR,
    library_default,
    load_options,
    prompt_argument,
    sampling_options,
)
from .report import (
    detections_report,
    echo_text,
    load_line,
    memory_line,
    plan_lines,
    profile_summary,
    show_progress,
    speed_line,
    stream_line,
    user_errors,
)

PROFILE_INTERVAL_S = 0.05  # RSS sampling period; VmHWM catches anything shorter


def _load(
    model_dir: Path,
    load: LoadOptions,
    on_phase: Callable[[str], None] | None = None,
    prompt: str = "",
    sampling: SamplingOptions | None = None,
) -> Session:
    """The session; with `sampling`, the request (`prompt`, "" for prompts read later) is part of the pre-flight."""
    max_new_tokens = None if sampling is None else sampling.max_new_tokens
    session = load_session(model_dir, load, on_phase, show_progress(), prompt=prompt, max_new_tokens=max_new_tokens)
    click.echo("\n".join([load_line(session), *plan_lines(session)]), err=True)
    return session


@click.command("generate")
@click.argument("model_dir", type=MODEL_DIR)
@click.argument("image", type=EXISTING_FILE)
@prompt_argument
@sampling_options
@load_options
@click.option(
    "--draw",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw the boxes (and masks) of a detect / segment answer onto a copy of IMAGE, saved here as PNG; boxes "
    "listed on stderr. Needs a detect or segment prompt, an existing directory and a file other than IMAGE "
    "(an existing one is replaced). An answer without boxes writes the copy unchanged, and says so.",
)
@click.option("--vae", type=EXISTING_FILE, help="vae-oid.npz, to decode segmentation masks for --draw.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (output, timings, memory) instead.")
def generate_command(
    model_dir: Path,
    image: Path,
    prompt: str,
    sampling: SamplingOptions,
    load: LoadOptions,
    draw: Path | None,
    vae: Path | None,
    as_json: bool,
) -> None:
    """Answer PROMPT about IMAGE; the answer streams to stdout, timings and memory go to stderr.

    \b
    Prompts: "caption en", "answer en what is on the table?", "ocr",
    "detect cat ; dog" or "segment cat" (with --draw out.png).
    """
    if vae is not None and draw is None:
        raise click.BadParameter("--vae is only used with --draw", param_hint="'--vae'")
    with user_errors(), MemoryProfiler(PROFILE_INTERVAL_S) as prof:
        if draw is not None:
            check_draw(prompt, draw, image)
        img = load_image(image)  # before the (slow) model load, so a bad image fails at once
        decoder = VQVAEDecoder.from_npz(vae) if vae else None
        # One answer per load: a layout's reorder is weighed against what it saves this one request.
        session = _load(model_dir, replace(load, requests=1), prompt=prompt, sampling=sampling)
        gen = run_prompt(session, session.encode(img), prompt, sampling, on_text=None if as_json else echo_text)
        found = draw_output(to_rgb(img), gen.text, draw, decoder) if draw else None
    peak = prof.peak()
    if as_json:
        record = {"image": str(image), "prompt": prompt, **gen.to_json(), "load_s": round(session.load_s, 4)}
        loaded = session.loaded
        record |= {"dtype": session.dtype, "quantize": loaded.quantize, "kernels": loaded.kernels.to_json()}
        record |= {"peak_rss": peak.hwm or peak.rss} | ({"detections": found} if found is not None else {})
        if session.loaded.streamer is not None:
            record["streaming"] = {"max_memory": load.max_memory, **asdict(session.loaded.streamer.stats)}
        click.echo(json.dumps(record, ensure_ascii=False))
    else:
        click.echo()  # end the streamed answer
    report = [speed_line(gen), memory_line(peak), *filter(None, [stream_line(session)])]
    if draw is not None and found is not None:
        report += detections_report(found, draw, decoder is not None)
    click.echo("\n".join(report), err=True)


def input_lines(stream: TextIO) -> Iterator[str]:
    """Lines of `stream` without their newline, with a `> ` prompt on stderr when a person is typing."""
    interactive = stream.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = stream.readline()
        if not line:
            return
        yield line.rstrip("\r\n")


def run_chat(
    session: Session,
    image_features: torch.Tensor,
    lines: Iterable[str],
    sampling: SamplingOptions,
    on_answer: Callable[[Generation], None],
) -> int:
    """Answer each line on the current image; `:image PATH` encodes another, `:quit` stops. Returns the answers."""
    answers = 0
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line == ":quit":
            break
        if line == ":image" or line.startswith(":image "):
            path = line.removeprefix(":image").strip()
            try:
                image = load_image(path)
            except ImageError as e:
                click.echo(f"Error: {e} (keeping the current image)", err=True)
                continue
            image_features = session.encode(image)
            click.echo(f"image: {path} ({image.width}x{image.height})", err=True)
            continue
        if line.startswith(":"):
            click.echo(f"Error: unknown command {line.split()[0]!r}; use :image PATH or :quit", err=True)
            continue
        try:
            check_prompt(line)
        except PromptError as e:
            click.echo(f"Error: {e}", err=True)
            continue
        try:
            gen = run_prompt(session, image_features, line, sampling, on_text=echo_text)
        except ContextLengthError as e:  # refused before the first token: the session goes on
            click.echo(f"Error: {e}", err=True)
            continue
        click.echo()
        on_answer(gen)
        answers += 1
    return answers


@click.command("chat")
@click.argument("model_dir", type=MODEL_DIR)
@click.argument("image", type=EXISTING_FILE)
@sampling_options
@load_options
def chat_command(model_dir: Path, image: Path, sampling: SamplingOptions, load: LoadOptions) -> None:
    """Ask many questions about one image: one prompt per line on stdin, the image is encoded once.

    \b
    :image PATH   switch to another image (encoded once)
    :quit         stop (so does end of input)
    """
    with user_errors(), MemoryProfiler(PROFILE_INTERVAL_S) as prof:
        img = load_image(image)
        session = _load(model_dir, load, sampling=sampling)  # the shortest prompt: each line is checked again
        features = session.encode(img)

        def report(gen: Generation) -> None:
            click.echo(f"[{speed_line(gen)}; {memory_line(prof.peak())}]", err=True)

        run_chat(session, features, input_lines(sys.stdin), sampling, report)


@click.command("profile")
@click.argument("model_dir", type=MODEL_DIR)
@click.argument("image", type=EXISTING_FILE)
@prompt_argument
@click.option("--out", type=NEW_DIR, required=True, help="Directory for profile.json (timeline) and profile.png.")
@sampling_options
@load_options
def profile_command(
    model_dir: Path, image: Path, prompt: str, out: Path, sampling: SamplingOptions, load: LoadOptions
) -> None:
    """Load the model and answer PROMPT once under the memory profiler, with phases load / encode / prefill / decode.

    Writes OUT/profile.json (RSS timeline with anon / file split and phase marks) and OUT/profile.png.
    """
    with user_errors():
        img = load_image(image)
        meta = {"label": f"{model_dir.name}: {load.quantize or load.dtype}", "prompt": prompt}
        with MemoryProfiler(PROFILE_INTERVAL_S, meta) as prof:
            with prof.phase("load"):
                session = _load(model_dir, load, lambda name: prof.mark(f"load: {name}"), prompt, sampling)
            prof.meta["model_bytes"] = session.weight_bytes
            prof.meta["label"] = f"{model_dir.name}: {session.loaded.quantize or session.dtype} on {session.device}"
            with prof.phase("encode"):
                features = session.encode(img)
            gen = run_prompt(session, features, prompt, sampling, phase=prof.phase)
        timeline = prof.timeline()
        files = [timeline.to_json(out / "profile.json"), plot_timeline(timeline, out / "profile.png")]
    click.echo("\n".join(profile_summary(gen, session, timeline, files)))


RAY_ONLY = ("ray_address", "workers", "worker_cpus")


@click.command("batch")
@click.argument("model_dir", type=MODEL_DIR)
@click.argument("images")
@prompt_argument
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="JSONL results, appended to. An image answered there with this prompt and these settings is skipped "
    "(resume); one that failed is tried again.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=library_default(run_batch, "batch_size"),
    show_default=True,
    help="Images generated together (a CPU decode step costs about the same for 1 or 8).",
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Spread the work over a Ray cluster (pip install 'lowmem_paligemma[ray]'); IMAGES may then be "
    "any folder Ray reads (s3://..., gs://...). docs/batch.md",
)
@click.option(
    "--ray-address",
    help="Cluster to join (--ray): host:6379, ray://host:10001 or auto. "
    "Default: the cluster `ray start` left on this machine, else a new local one.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=library_default(run_ray_batch, "workers"),
    show_default=True,
    help="Ray workers (--ray), each holding one model.",
)
@click.option(
    "--worker-cpus",
    type=click.IntRange(min=1),
    help="CPUs (torch threads) per Ray worker (--ray). Default: the cluster's CPUs shared out.",
)
@sampling_options
@load_options
def batch_command(
    model_dir: Path,
    images: str,
    prompt: str,
    out: Path,
    batch_size: int,
    use_ray: bool,
    ray_address: str | None,
    workers: int,
    worker_cpus: int | None,
    sampling: SamplingOptions,
    load: LoadOptions,
) -> None:
    """Answer PROMPT for every image in the folder IMAGES (jpg, jpeg, png, webp, bmp, gif), one JSON line each.

    A file that cannot be read as an image gets an error line and the run goes on. With --ray the images
    are answered by Ray workers (one model each) and the lines are the same.
    """
    from tqdm import tqdm

    ctx = click.get_current_context()
    for name in RAY_ONLY:
        if not use_ray and ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            raise click.BadParameter("only used with --ray", param_hint=f"'--{name.replace('_', '-')}'")
    if not use_ray and "://" in images:
        raise click.BadParameter(f"{images}: a URI is read by Ray workers only; add --ray", param_hint="'IMAGES'")
    if use_ray and importlib.util.find_spec("ray") is None:
        raise click.ClickException("--ray needs Ray: pip install 'lowmem_paligemma[ray]'")
    with user_errors():
        paths = list_image_paths(images)
        job = BatchJob.of(model_dir, prompt, sampling, load)
        plan = plan_run(paths, job, out)
        click.echo(plan.describe(len(paths), out), err=True)
        if not plan.todo:
            return
        on_error = lambda message: tqdm.write(f"error row: {message}", file=sys.stderr)  # keeps the bar intact
        if use_ray:
            connect(ray_address)
            resources = worker_resources(model_dir, load, job, sampling, batch_size, workers, worker_cpus)
            click.echo(resources.describe(workers), err=True)
            failed = run_ray_batch(
                model_dir, plan.todo, job, sampling, load, out, resources, batch_size=batch_size, workers=workers,
                progress=show_progress(), on_error=on_error,
            )  # fmt: skip
        else:
            session = _load(model_dir, load, prompt=prompt, sampling=sampling)
            failed = run_batch(session, plan.todo, job, sampling, out, batch_size, show_progress(), on_error)
    click.echo(f"answered {len(plan.todo) - failed}, {failed} unreadable (error rows); results in {out}", err=True)
