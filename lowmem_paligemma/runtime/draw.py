"""Drawing detect / segment answers: refusing a drawing that cannot be what the user wants, before any work, and
drawing the boxes (and masks) of an answer onto a copy of the image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import OutputError, PromptError
from ..model.tasks import VQVAEDecoder, draw_detections, parse_detections, paste_mask, to_pixels

DRAW_TASKS = ("detect", "segment")  # the prompts whose answers hold <loc> boxes (docs/model.md, "Output formats")


def check_draw(prompt: str, path: Path, source: Path | None = None) -> None:
    """Refuse, before any work, a drawing that cannot be what the user wants.

    The prompt must ask for boxes; `path` must not be the input image `source` (the answer drawn over the
    picture it came from would be lost with the original); its directory must exist: none is created.
    """
    words = prompt.split()
    if not words or words[0] not in DRAW_TASKS:
        raise PromptError(f'drawing needs a detect or segment prompt (e.g. "detect cat ; dog"), got {prompt!r}')
    if source is not None and _same_file(path, source):
        raise OutputError(f"{path}: this is the input image; draw into a new file")
    _check_directory(path)


def _check_directory(path: Path) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"{path}: the directory {path.parent} does not exist (it is not created for you)")


def _same_file(a: Path, b: Path) -> bool:
    # resolve() sees through symbolic links and "..", samefile() through hard links.
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def draw_output(image: Image.Image, text: str, path: Path, vae: VQVAEDecoder | None) -> list[dict[str, Any]]:
    """Parse detect/segment output, draw it on `image` as a PNG at `path`; the objects in pixels (x0, y0, x1, y1).

    An answer without boxes still writes `path` (an unchanged copy: no objects is an answer); the caller says so.
    """
    _check_directory(path)
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
