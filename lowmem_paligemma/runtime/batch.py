"""Answer one prompt for many images, several at a time, into a JSONL results file that a killed run resumes.

One line per image (docs/batch.md has the schema): an answer {"image", "path", "prompt", "settings", "output",
"tokens", "seconds", "batch"} or an error {"image", "path", "prompt", "settings", "error"} for a file that
cannot be read as an image (the run goes on). The same code answers the local command and every Ray worker
(ray_batch.py), so both write the same lines.

What is special:
- Resume keys on the image path, the prompt and `settings` (every sampling option and every load option
  that changes the answer, `ANSWER_FIELDS`): another prompt or other settings into the same file is new
  work. Only answers count as done; an image whose last try failed is tried again.
- A killed run loses nothing and duplicates nothing: a batch's lines go out in one `write` on an
  O_APPEND descriptor, and a line cut short by a kill (one record, never a finished one) is cut off the
  file by the next run before it appends.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ImageError
from ..model.generate import encode_image
from ..model.processor import Processor, decode_image, load_image
from ..model.sampling import SamplingOptions
from ..pretrained.options import LoadOptions
from .session import Session, run_prompts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# LoadOptions fields that change how a model runs but not what it answers; every other field (dtype, and any
# added later) is part of a record's settings, so a run with another value does the work again.
RUN_ONLY_LOAD_FIELDS = ("device", "zero_copy", "preflight", "max_memory", "prefetch", "verify", "requests")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_image_paths(images: str) -> list[str]:
    """The image paths under `images`, sorted: a local folder (absolute paths) or a URI that pyarrow reads
    (s3://bucket/dir, gs://..., file:///dir), each listed as `scheme://path`."""
    if "://" not in images:
        folder = Path(images)
        if not folder.is_dir():
            raise ImageError(f"{folder}: no such folder")
        return [str(p.absolute()) for p in list_images(folder)]
    from pyarrow import fs  # installed with the `ray` extra

    scheme = images.split("://", 1)[0]
    try:
        filesystem, root = fs.FileSystem.from_uri(images)
        infos = filesystem.get_file_info(fs.FileSelector(root))
    except (OSError, ValueError) as e:
        raise ImageError(f"{images}: cannot list the folder ({e})") from None
    return sorted(
        f"{scheme}://{info.path}"
        for info in infos
        if info.type == fs.FileType.File and Path(info.path).suffix.lower() in IMAGE_SUFFIXES
    )


def image_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class BatchJob:
    """What every line of one run answers: the prompt and the settings the answer depends on."""

    prompt: str
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model_dir: str | os.PathLike, prompt: str, sampling: SamplingOptions, load: LoadOptions) -> BatchJob:
        """Settings: the model directory's name, every sampling option, the load options that change answers."""
        loaded = {k: v for k, v in asdict(load).items() if k not in RUN_ONLY_LOAD_FIELDS}
        return cls(prompt, {"model": Path(model_dir).name} | asdict(sampling) | loaded)

    def key(self, path: str) -> str:
        return json.dumps([path, self.prompt, self.settings], sort_keys=True)

    def record_key(self, record: dict[str, Any]) -> str | None:
        """The key a results line answers, or None for a line of another shape (an older file's, a foreign one)."""
        path, prompt, settings = record.get("path"), record.get("prompt"), record.get("settings")
        if not (isinstance(path, str) and isinstance(prompt, str) and isinstance(settings, dict)):
            return None
        return json.dumps([path, prompt, settings], sort_keys=True)

    def head(self, path: str) -> dict[str, Any]:
        return {"image": image_name(path), "path": path, "prompt": self.prompt, "settings": self.settings}


# --- what a results file already holds --------------------------------------------------------------------------


def read_records(results: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a results file; a line that does not parse (a killed run's) is passed over."""
    if not results.is_file():
        return
    with results.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


@dataclass
class Plan:
    """The images of a run split by what the results file says about them under this job."""

    todo: list[str]  # to answer now, in listing order
    answered: int = 0  # answered before with this prompt and settings: skipped
    retried: int = 0  # in todo because every earlier try failed
    other: int = 0  # in todo; the file answers them only for another prompt or other settings
    torn: bool = False  # the file ends in half a line (a killed run): it is cut before appending

    def describe(self, total: int, results: Path) -> str:
        parts = [f"{self.answered} already answered in {results} with this prompt and settings (skipped)"]
        if self.retried:
            parts.append(f"{self.retried} failed before (retried)")
        if self.other:
            parts.append(f"{self.other} answered there only with another prompt or other settings (done again)")
        torn = "; dropping a half-written last line left by a killed run" if self.torn else ""
        return f"{total} image(s): " + ", ".join(parts) + f"; {len(self.todo)} to do{torn}"


def plan_run(paths: list[str], job: BatchJob, results: Path) -> Plan:
    answered: set[str] = set()
    failed: set[str] = set()
    seen_paths: set[str] = set()
    for record in read_records(results):
        if isinstance(record.get("path"), str) and "error" not in record:
            seen_paths.add(record["path"])
        key = job.record_key(record)
        if key is None:
            continue
        (failed if "error" in record else answered).add(key)
    plan = Plan(todo=[], torn=_ends_torn(results))
    for path in paths:
        key = job.key(path)
        if key in answered:
            plan.answered += 1
            continue
        plan.todo.append(path)
        plan.retried += key in failed
        plan.other += key not in failed and path in seen_paths
    return plan


def _ends_torn(results: Path) -> bool:
    if not results.is_file() or results.stat().st_size == 0:
        return False
    with results.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


# --- writing: whole lines only -----------------------------------------------------------------------------------


def drop_torn_tail(results: Path) -> int:
    """Cut a last line that a killed run left unfinished (no newline); returns the bytes cut."""
    if not results.is_file():
        return 0
    with results.open("r+b") as f:
        size = end = f.seek(0, os.SEEK_END)
        keep = 0
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep < size:
            f.truncate(keep)
    return size - keep


class ResultsFile:
    """Appends records, each call's lines in one write on an O_APPEND descriptor (so a kill leaves whole lines,
    or one torn last line that `drop_torn_tail` removes)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = drop_torn_tail(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, records: list[dict[str, Any]]) -> None:
        data = memoryview("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        while data:  # a regular file takes it all in one call unless the disk is full; loop for that case
            data = data[os.write(self.fd, data) :]

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def open_results(path: Path) -> Iterator[ResultsFile]:
    results = ResultsFile(path)
    try:
        yield results
    finally:
        results.close()


# --- answering a batch of images ---------------------------------------------------------------------------------


def prepare_image(processor: Processor, path: str, data: bytes | None = None) -> torch.Tensor | str:
    """(1, 3, S, S) pixel values of the image at `path` (read from disk, or decoded from `data`, its bytes
    as Ray read them), or the one-line reason it cannot be used."""
    try:
        image = load_image(path) if data is None else decode_image(io.BytesIO(data), path)
    except ImageError as e:
        return str(e)
    try:
        return processor.pixel_values(image)
    except (OSError, ValueError) as e:  # a decoded mode PIL cannot convert to RGB
        return f"{path}: cannot convert to RGB ({e})"


def answer_batch(
    session: Session, job: BatchJob, sampling: SamplingOptions, items: list[tuple[str, torch.Tensor | str]]
) -> list[dict[str, Any]]:
    """One record per (path, pixel values or error) in order; the images are encoded and answered together."""
    t0 = time.perf_counter()
    good = [i for i, (_, x) in enumerate(items) if isinstance(x, torch.Tensor)]
    answers = {}
    if good:
        features = encode_image(session.model, torch.cat([items[i][1] for i in good]))
        answers = dict(zip(good, run_prompts(session, features, [job.prompt] * len(good), sampling)))
    seconds = round((time.perf_counter() - t0) / len(items), 3)  # each image's share of the batch
    records = []
    for i, (path, x) in enumerate(items):
        if i in answers:
            gen = answers[i]
            tail = {"output": gen.text, "tokens": len(gen.token_ids), "seconds": seconds, "batch": len(good)}
        else:
            tail = {"error": x}
        records.append(job.head(path) | tail)
    return records


def run_batch(
    session: Session,
    paths: list[str],
    job: BatchJob,
    sampling: SamplingOptions,
    results: Path,
    batch_size: int = 1,
    progress: bool = False,
    on_error: Callable[[str], None] | None = None,
) -> int:
    """Answer `paths` (local files) `batch_size` at a time, appending each batch's lines as it finishes.

    Returns the number of error rows; `progress` draws a bar on stderr, `on_error(message)` hears each one.
    """

    def batches() -> Iterator[list[dict]]:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            yield answer_batch(session, job, sampling, [(p, prepare_image(session.processor, p)) for p in chunk])

    return write_records(results, batches(), len(paths), progress, on_error)


def write_records(
    results: Path,
    batches: Iterable[list[dict]],
    total: int,
    progress: bool = False,
    on_error: Callable[[str], None] | None = None,
) -> int:
    """Append each list of records to `results` as it comes (computed lazily, after the file is opened and
    any torn last line cut), with a bar over `total` images on stderr. Returns the number of error rows."""
    from tqdm import tqdm

    failed = 0
    with (
        open_results(results) as out,
        tqdm(total=total, desc="images", unit="img", file=sys.stderr, dynamic_ncols=True, disable=not progress)
        as bar,
    ):  # fmt: skip
        for records in batches:
            out.write(records)
            for record in records:
                if "error" in record:
                    failed += 1
                    if on_error:
                        on_error(record["error"])
            bar.update(len(records))
    return failed
