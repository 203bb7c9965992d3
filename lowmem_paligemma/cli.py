"""`lowmem-paligemma`: generate, chat, profile, batch, synth and convert from the command line.

What is special:
- Each command is a few lines over the typed functions in the first half of this file (load a session, encode
  an image once, run one prompt, draw detections, keep the batch results file resumable).
- Results go to stdout (streamed tokens, JSON, paths written); diagnostics go to stderr (load time, prefill time,
  tokens/s, peak RSS with its anon / file split, progress bars).
- Every failure a user can cause (a missing or broken checkpoint, a bad config or tokenizer, a file that is not
  an image, an empty prompt, a bad option value) ends as one `Error: ...` line and a non-zero exit code, never a
  traceback; anything else is a bug and keeps its traceback.
- Defaults are defined once: the load dtype in `DEFAULT_DTYPE`, the sampling defaults in `Sampling`, the writers'
  defaults (synth, convert) are read from the library functions' own signatures.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO

import click
import torch
from PIL import Image
from tqdm import tqdm

from .config import PRESETS, ConfigError
from .convert import CONVERT_DTYPES, convert_checkpoint
from .generate import TextStream, encode_image, generate
from .loader import CheckpointError, load_model
from .paligemma import PaliGemmaForConditionalGeneration
from .plot import plot_timeline
from .processor import (
    IMAGE_TOKEN,
    ImageError,
    Processor,
    TokenizerError,
    load_image,
    to_rgb,
)
from .profiler import MemoryProfiler, Peak, Timeline
from .synth import tiny_checkpoint, write_checkpoint
from .tasks import VAEWeightsError, VQVAEDecoder, draw_detections, parse_detections, paste_mask, to_pixels

# --- defaults, defined once ----------------------------------------------------------------------------------------

DEFAULT_DTYPE = "bfloat16"  # same memory as float16; the fastest CPU compute here (docs/speed.md, docs/kernels.md)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEVICES = ("auto", "cpu", "cuda", "mps")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PROFILE_INTERVAL_S = 0.05  # RSS sampling period; VmHWM catches anything shorter
PROFILE_PHASES = ("load", "encode", "prefill", "decode")  # the marks `profile` writes, in order
# Failures a user can cause and fix: one `Error:` line. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError,
    ConfigError,
    TokenizerError,
    ImageError,
    VAEWeightsError,
    OSError,
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _library_default(fn: Callable[..., object], name: str) -> Any:
    """A library function's own default, so the CLI never restates it."""
    return inspect.signature(fn).parameters[name].default


@dataclass(frozen=True)
class LoadOptions:
    dtype: str = DEFAULT_DTYPE  # a key of DTYPES
    device: str = "auto"  # resolved to cpu / cuda / mps when the option is parsed
    zero_copy: bool = False  # map the shards instead of copying (CPU, checkpoint stored in `dtype`)
    force: bool = False  # skip the loader's free-memory pre-flight


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


# --- sizes ("5GB", "100KB") ----------------------------------------------------------------------------------------

# Decimal units as transformers' `max_shard_size` ("5GB" = 5e9 bytes, the Hub's shards); binary with an "i".
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '100KiB' -> 102_400, '4096' -> 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", text)
    unit = _SIZE_UNITS.get(m[2].lower()) if m else None
    if m is None or unit is None:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MB, 100KB or a byte count")
    n = int(float(m[1]) * unit)
    if n <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return n


def format_size(n: int) -> str:
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


class ByteSize(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


# --- running the model ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    """A loaded model and its processor, reused for every prompt of a command."""

    model: PaliGemmaForConditionalGeneration
    processor: Processor
    load_s: float
    load: LoadOptions

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def load_session(
    model_dir: Path, load: LoadOptions, on_phase: Callable[[str], None] | None = None, progress: bool = True
) -> Session:
    t0 = time.perf_counter()
    processor = Processor.from_pretrained(model_dir)  # small files first: a bad tokenizer fails before the weights
    model = load_model(
        model_dir,
        device=load.device,
        dtype=DTYPES[load.dtype],
        zero_copy=load.zero_copy,
        force=load.force,
        progress=progress and sys.stderr.isatty(),  # a transient bar: only worth drawing on a terminal
        on_phase=on_phase,
    )
    return Session(model, processor, time.perf_counter() - t0, load)


def encode(session: Session, image: Image.Image) -> torch.Tensor:
    """(1, N, D) image features: computed once per image and reused by every prompt on it."""
    return encode_image(session.model, session.processor.pixel_values(image))


@dataclass
class Generation:
    text: str  # decoded with special tokens skipped (<loc>/<seg> survive)
    token_ids: list[int]  # as generated, including a final EOS
    prompt_tokens: int
    prefill_s: float  # prompt in, first token out
    decode_s: float  # every further token

    @property
    def tokens_per_s(self) -> float | None:
        n = len(self.token_ids) - 1  # the first token comes out of the prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        rate = self.tokens_per_s
        return {
            "output": self.text,
            "tokens": len(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "tokens_per_s": None if rate is None else round(rate, 2),
        }


def run_prompt(
    session: Session,
    image_features: torch.Tensor,
    prompt: str,
    sampling: Sampling,
    on_text: Callable[[str], None] | None = None,
    phase: Callable[[str], AbstractContextManager[object]] = nullcontext,
) -> Generation:
    """Generate for one prompt on already-encoded image features; `on_text` receives the text as it grows.

    `phase(name)` wraps the "prefill" (prompt in, first token out) and "decode" (the rest) steps, e.g. with
    `MemoryProfiler.phase`.
    """
    input_ids, token_type_ids = session.processor.prompt_inputs(prompt)
    tokens = generate(
        session.model,
        input_ids,
        token_type_ids,
        image_features=image_features,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=sampling.seed,
    )
    stream = TextStream(session.processor.tokenizer)
    ids: list[int] = []

    def take(token: int) -> None:
        ids.append(token)
        piece = stream.push(token) if on_text else ""
        if piece and on_text:
            on_text(piece)

    t0 = time.perf_counter()
    with phase("prefill"):
        take(next(tokens))  # generate() always yields at least one token
    t1 = time.perf_counter()
    with phase("decode"):
        for token in tokens:
            take(token)
    t2 = time.perf_counter()
    text = session.processor.decode(ids)
    if on_text and text.startswith(stream.text) and len(text) > len(stream.text):
        on_text(text[len(stream.text) :])  # a character the stream held back as incomplete bytes
    return Generation(text, ids, int(input_ids.shape[1]), t1 - t0, t2 - t1)


def draw_output(image: Image.Image, text: str, path: Path, vae: VQVAEDecoder | None) -> list[dict[str, Any]]:
    """Parse detect/segment output, draw it on `image` as a PNG at `path`; the objects in pixels (x0, y0, x1, y1)."""
    dets = parse_detections(text)
    width, height = image.size
    boxes = [to_pixels(d, width, height) for d in dets]
    masks = None
    if vae is not None and any(d.seg is not None for d in dets):
        masks = [
            None if d.seg is None else paste_mask(vae.decode_masks([d.seg])[0], box, width, height)
            for d, box in zip(dets, boxes)
        ]
    draw_detections(image, dets, path, masks)
    return [
        {
            "label": d.label,
            "box": list(box),
            "mask": masks is not None and masks[i] is not None,
            "seg": d.seg is not None,
        }
        for i, (d, box) in enumerate(zip(dets, boxes))
    ]


# --- batch bookkeeping ---------------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def recorded_images(results: Path) -> set[str]:
    """Image names already in a results file, answered or failed; an unreadable line (a killed run) counts as none."""
    if not results.is_file():
        return set()
    names = set()
    for line in results.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("image"), str):
            names.add(record["image"])
    return names


@contextmanager
def open_results(path: Path) -> Iterator[TextIO]:
    """The results file in append mode, starting on a fresh line if a killed run left half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as f:
        if torn:
            f.write("\n")
        yield f


def answer_image(session: Session, path: Path, prompt: str, sampling: Sampling) -> dict[str, Any]:
    """One JSONL record: the answer for `path`, or the reason it could not be read."""
    t0 = time.perf_counter()
    try:
        image = load_image(path)
    except ImageError as e:
        return {"image": path.name, "error": str(e)}
    gen = run_prompt(session, encode(session, image), prompt, sampling)
    seconds = round(time.perf_counter() - t0, 3)
    return {"image": path.name, "prompt": prompt, "output": gen.text, "tokens": len(gen.token_ids), "seconds": seconds}


def run_batch(session: Session, images: list[Path], prompt: str, sampling: Sampling, results: Path) -> int:
    """Append one record per image (flushed as it is written, so a killed run resumes); returns the failures."""
    failed = 0
    with open_results(results) as f:
        for path in tqdm(images, desc="images", unit="img", file=sys.stderr, dynamic_ncols=True):
            record = answer_image(session, path, prompt, sampling)
            if "error" in record:
                failed += 1
                tqdm.write(f"skipped {record['error']}", file=sys.stderr)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    return failed


# --- chat ----------------------------------------------------------------------------------------------------------


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
    sampling: Sampling,
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
            image_features = encode(session, image)
            click.echo(f"image: {path} ({image.width}x{image.height})", err=True)
            continue
        if line.startswith(":"):
            click.echo(f"Error: unknown command {line.split()[0]!r}; use :image PATH or :quit", err=True)
            continue
        if IMAGE_TOKEN in line:
            click.echo(f"Error: a prompt must not contain {IMAGE_TOKEN}; the image tokens are added for you", err=True)
            continue
        gen = run_prompt(session, image_features, line, sampling, on_text=_echo_text)
        click.echo()
        on_answer(gen)
        answers += 1
    return answers


# --- reports (stderr) ----------------------------------------------------------------------------------------------


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def load_line(session: Session) -> str:
    return (
        f"loaded {_human(session.weight_bytes)} of weights ({session.load.dtype} on {session.load.device}) "
        f"in {session.load_s:.2f} s"
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
    return f"peak RSS {_human(peak.hwm or peak.rss)} (anon {_human(peak.anon)}, file {_human(peak.file)})"


def detections_report(found: list[dict[str, Any]], path: Path, has_vae: bool) -> list[str]:
    lines = [f"{len(found)} object(s) drawn on {path}" + (" (boxes x0, y0, x1, y1 in pixels):" if found else "")]
    for d in found:
        lines.append(f"  {d['label'] or '(no label)'}: {tuple(d['box'])}" + (" + mask" if d["mask"] else ""))
    if not has_vae and any(d["seg"] for d in found):
        lines.append("segmentation codes found: pass --vae vae-oid.npz to draw the masks")
    return lines


def profile_summary(gen: Generation, session: Session, timeline: Timeline, files: list[Path]) -> list[str]:
    at_mark = {s.t: s.rss for s in timeline.samples}
    done = {m.name: at_mark.get(m.t) for m in timeline.marks}
    after = ", ".join(f"{p} {_human(done[f'{p} done'])}" for p in PROFILE_PHASES if f"{p} done" in done)
    return [
        f"output   : {gen.text}",
        f"load     : {session.load_s:.2f} s, {_human(session.weight_bytes)} of {session.load.dtype} weights",
        f"generate : {speed_line(gen)}",
        f"memory   : {memory_line(timeline.peak())}",
        f"RSS after: {after}",
        f"wrote    : {', '.join(map(str, files))}",
    ]


def _echo_text(piece: str) -> None:
    click.echo(piece, nl=False)  # click.echo flushes: tokens appear as they are generated


@contextmanager
def user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Expected failures become one `Error: ...` line and exit code 1; anything else keeps its traceback."""
    try:
        yield
    except (*USER_ERRORS, *extra) as e:
        message = str(e).strip().splitlines()
        raise click.ClickException(message[0] if message else type(e).__name__) from None


@contextmanager
def byte_progress(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr driven by the writers' `progress(bytes_done, bytes_total)` callback."""
    with tqdm(
        desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False, disable=not sys.stderr.isatty()
    ) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def write_synthetic(
    out_dir: Path,
    preset: str | None,
    gemma2: bool,
    dtype: torch.dtype,
    max_shard_bytes: int | None,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """`preset` None: the tiny test model. `max_shard_bytes` None: the writer's default for that size."""
    shard = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    if preset is None:
        return tiny_checkpoint(out_dir, gemma2, dtype=dtype, seed=seed, progress=progress, **shard)
    return write_checkpoint(out_dir, PRESETS[preset], dtype=dtype, seed=seed, progress=progress, **shard)


# --- option definitions (shared) -----------------------------------------------------------------------------------


def _resolve_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available (no GPU, or a CPU-only torch build)", ctx, param)
    if value == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter("MPS (Apple GPU) is not available on this machine", ctx, param)
    return value


def _check_prompt(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter('the prompt is empty; try "caption en", "answer en <question>" or "detect cat"')
    if IMAGE_TOKEN in value:
        raise click.BadParameter(f"the prompt must not contain {IMAGE_TOKEN}; the image tokens are added for you")
    return value


def _check_finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


def _with_options(
    options: list[Callable[[Any], Any]], cls: type[Sampling] | type[LoadOptions], name: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add `options` (one per field of `cls`) to a command, which receives them as one `name=cls(...)`."""
    keys = [f.name for f in fields(cls)]

    def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = cls(**{k: kwargs.pop(k) for k in keys})
            return f(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorator


_S = Sampling()
sampling_options = _with_options(
    [
        click.option(
            "--max-new-tokens",
            type=click.IntRange(min=1),
            default=_S.max_new_tokens,
            show_default=True,
            help="Stop after this many generated tokens (or at EOS).",
        ),
        click.option(
            "--temperature",
            type=click.FloatRange(min=0.0),
            default=_S.temperature,
            show_default=True,
            callback=_check_finite,
            help="Sampling temperature; 0 is greedy (top-k / top-p then unused).",
        ),
        click.option("--top-k", type=click.IntRange(min=1), default=_S.top_k, help="Sample among the k likeliest."),
        click.option(
            "--top-p",
            type=click.FloatRange(0.0, 1.0, min_open=True),
            default=_S.top_p,
            help="Nucleus sampling: the likeliest tokens holding this much probability.",
        ),
        click.option("--seed", type=int, default=_S.seed, help="Seed for sampling (reproducible output)."),
    ],
    Sampling,
    "sampling",
)

_L = LoadOptions()
load_options = _with_options(
    [
        click.option(
            "--dtype",
            type=click.Choice(list(DTYPES)),
            default=_L.dtype,
            show_default=True,
            help="Weight dtype in memory (the checkpoint is converted while it streams in).",
        ),
        click.option(
            "--device",
            type=click.Choice(DEVICES),
            default=_L.device,
            show_default=True,
            callback=_resolve_device,
            help="auto: cuda when available, else cpu.",
        ),
        click.option(
            "--zero-copy",
            is_flag=True,
            default=_L.zero_copy,
            help="Map the weight files instead of copying them (cpu; checkpoint stored in --dtype).",
        ),
        click.option(
            "--force",
            is_flag=True,
            default=_L.force,
            help="Load even if the memory pre-flight says the model will not fit.",
        ),
    ],
    LoadOptions,
    "load",
)

MODEL_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
NEW_DIR = click.Path(file_okay=False, path_type=Path)
prompt_argument = click.argument("prompt", callback=_check_prompt)


def _package_version() -> str:
    try:
        return version("lowmem_paligemma")
    except PackageNotFoundError:
        return "unknown (not installed)"


# --- commands ------------------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_package_version(), prog_name="lowmem-paligemma")
def main() -> None:
    """Low-RAM PaliGemma / PaliGemma 2: stream a Hub checkpoint in, then caption, answer, detect and segment.

    MODEL_DIR is a Hub-layout directory (config.json, *.safetensors, tokenizer files).
    """


@main.command("generate")
@click.argument("model_dir", type=MODEL_DIR)
@click.argument("image", type=EXISTING_FILE)
@prompt_argument
@sampling_options
@load_options
@click.option(
    "--draw",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw detect / segment output onto IMAGE and save it here as PNG; boxes listed on stderr.",
)
@click.option("--vae", type=EXISTING_FILE, help="vae-oid.npz, to decode segmentation masks for --draw.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (output, timings, memory) instead.")
def generate_command(
    model_dir: Path,
    image: Path,
    prompt: str,
    sampling: Sampling,
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
        img = load_image(image)  # before the (slow) model load, so a bad image fails at once
        decoder = VQVAEDecoder.from_npz(vae) if vae else None
        session = load_session(model_dir, load)
        click.echo(load_line(session), err=True)
        gen = run_prompt(session, encode(session, img), prompt, sampling, on_text=None if as_json else _echo_text)
        found = draw_output(to_rgb(img), gen.text, draw, decoder) if draw else None
    peak = prof.peak()
    if as_json:
        record = {"image": str(image), "prompt": prompt, **gen.to_json(), "load_s": round(session.load_s, 4)}
        record |= {"peak_rss": peak.hwm or peak.rss} | ({"detections": found} if found is not None else {})
        click.echo(json.dumps(record, ensure_ascii=False))
    else:
        click.echo()  # end the streamed answer
    report = [speed_line(gen), memory_line(peak)]
    if draw is not None and found is not None:
        report += detections_report(found, draw, decoder is not None)
    click.echo("\n".join(report), err=True)


@main.command("chat")
@click.argument("model_dir", type=MODEL_DIR)
@click.argument("image", type=EXISTING_FILE)
@sampling_options
@load_options
def chat_command(model_dir: Path, image: Path, sampling: Sampling, load: LoadOptions) -> None:
    """Ask many questions about one image: one prompt per line on stdin, the image is encoded once.

    \b
    :image PATH   switch to another image (encoded once)
    :quit         stop (so does end of input)
    """
    with user_errors(), MemoryProfiler(PROFILE_INTERVAL_S) as prof:
        img = load_image(image)
        session = load_session(model_dir, load)
        click.echo(load_line(session), err=True)
        features = encode(session, img)

        def report(gen: Generation) -> None:
            click.echo(f"[{speed_line(gen)}; {memory_line(prof.peak())}]", err=True)

        run_chat(session, features, input_lines(sys.stdin), sampling, report)


@main.command("profile")
@click.argument("model_dir", type=MODEL_DIR)
@click.argument("image", type=EXISTING_FILE)
@prompt_argument
@click.option("--out", type=NEW_DIR, required=True, help="Directory for profile.json (timeline) and profile.png.")
@sampling_options
@load_options
def profile_command(
    model_dir: Path, image: Path, prompt: str, out: Path, sampling: Sampling, load: LoadOptions
) -> None:
    """Load the model and answer PROMPT once under the memory profiler, with phases load / encode / prefill / decode.

    Writes OUT/profile.json (RSS timeline with anon / file split and phase marks) and OUT/profile.png.
    """
    with user_errors():
        img = load_image(image)
        meta = {"label": f"{model_dir.name}: {load.dtype} on {load.device}", "prompt": prompt}
        with MemoryProfiler(PROFILE_INTERVAL_S, meta) as prof:
            with prof.phase("load"):
                session = load_session(model_dir, load, on_phase=lambda name: prof.mark(f"load: {name}"))
            prof.meta["model_bytes"] = session.weight_bytes
            with prof.phase("encode"):
                features = encode(session, img)
            gen = run_prompt(session, features, prompt, sampling, phase=prof.phase)
        timeline = prof.timeline()
        files = [timeline.to_json(out / "profile.json"), plot_timeline(timeline, out / "profile.png")]
    click.echo("\n".join(profile_summary(gen, session, timeline, files)))


@main.command("batch")
@click.argument("model_dir", type=MODEL_DIR)
@click.argument("image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@prompt_argument
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="JSONL results, appended to: images already in it are skipped (resume; delete a line to redo).",
)
@sampling_options
@load_options
def batch_command(
    model_dir: Path, image_dir: Path, prompt: str, out: Path, sampling: Sampling, load: LoadOptions
) -> None:
    """Answer PROMPT for every image in IMAGE_DIR (jpg, jpeg, png, webp, bmp, gif), one JSON line per image.

    A file that cannot be read as an image gets an {"image", "error"} line and the run goes on.
    """
    with user_errors():
        images = list_images(image_dir)
        done = recorded_images(out)
        todo = [p for p in images if p.name not in done]
        click.echo(f"{len(images)} image(s) in {image_dir}, {len(images) - len(todo)} already in {out}", err=True)
        if not todo:
            return
        session = load_session(model_dir, load)
        click.echo(load_line(session), err=True)
        failed = run_batch(session, todo, prompt, sampling, out)
    click.echo(f"answered {len(todo) - failed}, skipped {failed} unreadable; results in {out}", err=True)


@main.command("synth")
@click.argument("out_dir", type=NEW_DIR)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="A full-size configuration (e.g. paligemma-3b-224).")
@click.option("--tiny", is_flag=True, help="The tiny test configuration instead (a few hundred KB).")
@click.option("--gemma2", is_flag=True, help="With --tiny: the PaliGemma 2 (Gemma 2 decoder) variant.")
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    show_default=True,
    default=_dtype_name(_library_default(write_checkpoint, "dtype")),
    help="Stored weight dtype.",
)
@click.option(
    "--max-shard-size",
    type=ByteSize(),
    help="Largest shard file, e.g. 5GB, 100KB [default: the Hub's 5GB; small shards for --tiny].",
)
@click.option(
    "--seed",
    type=int,
    default=_library_default(write_checkpoint, "seed"),
    show_default=True,
    help="Weights depend only on the seed (and the tensor names), not on dtype or sharding.",
)
def synth_command(
    out_dir: Path, preset: str | None, tiny: bool, gemma2: bool, dtype: str, max_shard_size: int | None, seed: int
) -> None:
    """Write a random-weight checkpoint in the exact Hub layout (weights, config, tokenizer) into OUT_DIR."""
    if (preset is None) == (not tiny):
        raise click.UsageError("choose one of --preset NAME or --tiny")
    if gemma2 and not tiny:
        raise click.BadParameter(
            "goes with --tiny; PaliGemma 2 presets are named paligemma2-*", param_hint="'--gemma2'"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise click.ClickException(f"{out_dir}: exists and is not empty; choose a new directory")
    with user_errors(), byte_progress("writing") as progress:
        path = write_synthetic(out_dir, preset, gemma2, DTYPES[dtype], max_shard_size, seed, progress)
    click.echo(path)


@main.command("convert")
@click.argument("src", type=MODEL_DIR)
@click.argument("dst", type=NEW_DIR)
@click.option(
    "--dtype",
    type=click.Choice([_dtype_name(d) for d in CONVERT_DTYPES]),
    show_default=True,
    default=_dtype_name(_library_default(convert_checkpoint, "dtype")),
    help="Dtype of the float tensors.",
)
@click.option(
    "--max-shard-size",
    type=ByteSize(),
    show_default=True,
    default=format_size(_library_default(convert_checkpoint, "max_shard_bytes")),
    help="Largest shard file, e.g. 5GB, 2GB, 100KB.",
)
def convert_command(src: Path, dst: Path, dtype: str, max_shard_size: int) -> None:
    """Rewrite the checkpoint in SRC with its float tensors in DTYPE, into the new directory DST (low RAM).

    Config, tokenizer and processor files come along; e.g. the Hub's float32 weights become half the size.
    """
    with user_errors(ValueError), byte_progress("converting") as progress:  # ValueError: a bad destination
        path = convert_checkpoint(src, dst, DTYPES[dtype], max_shard_size, progress=progress)
    click.echo(path)


if __name__ == "__main__":
    main()
