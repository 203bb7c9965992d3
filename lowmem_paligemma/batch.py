"""Answer one prompt for every image of a folder into a JSONL results file that a killed run resumes.

Each image gets one line, flushed as it is written: {"image", "prompt", "output", "tokens", "seconds"}, or
{"image", "error"} for a file that cannot be read as an image (the run goes on). Images already in the
file are skipped on the next run. A run killed mid-line leaves a torn last line: it is ignored when
reading and the next run starts on a fresh line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from .errors import ImageError
from .processor import load_image
from .runtime import SamplingOptions, Session, run_prompt

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


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


def answer_image(session: Session, path: Path, prompt: str, sampling: SamplingOptions) -> dict[str, Any]:
    """One JSONL record: the answer for `path`, or the reason it could not be read."""
    t0 = time.perf_counter()
    try:
        image = load_image(path)
    except ImageError as e:
        return {"image": path.name, "error": str(e)}
    gen = run_prompt(session, session.encode(image), prompt, sampling)
    seconds = round(time.perf_counter() - t0, 3)
    return {"image": path.name, "prompt": prompt, "output": gen.text, "tokens": len(gen.token_ids), "seconds": seconds}


def run_batch(
    session: Session,
    images: list[Path],
    prompt: str,
    sampling: SamplingOptions,
    results: Path,
    progress: bool = False,
    on_skip: Callable[[str], None] | None = None,
) -> int:
    """Append one record per image (flushed as written, so a killed run resumes); returns the failures.

    `progress` draws a bar on stderr; `on_skip(message)` hears about each unreadable image.
    """
    from tqdm import tqdm

    failed = 0
    bar = tqdm(images, desc="images", unit="img", file=sys.stderr, dynamic_ncols=True, disable=not progress)
    with open_results(results) as f:
        for path in bar:
            record = answer_image(session, path, prompt, sampling)
            if "error" in record:
                failed += 1
                if on_skip:
                    on_skip(f"skipped {record['error']}")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    return failed
