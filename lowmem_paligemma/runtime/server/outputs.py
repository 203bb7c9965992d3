"""PaliGemma's answers as data: the `paligemma` field both API flavours add to a finished response.

    {"detections": [{"label": "cat", "box": [x0, y0, x1, y1], "mask": "<base64 PNG>" | null}, ...],
     "timings": {"queued_s", "ttft_s", "prefill_s", "decode_s", "decode_tokens_per_s", "cached"},
     "memory": {"rss_bytes": ...}}

`detections` is there for `detect` / `segment` prompts only (runtime/draw.py's DRAW_TASKS), parsed from the answer
text by model/tasks.py as the CLI's --draw does: boxes in pixels of the image as sent (to_pixels: clamped, corners
ordered), a mask the size of that image (grey PNG, 255 = inside) when the answer has <seg> codes and the server
has a VAE (--vae), else null. The answer text itself is never changed.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from ...model.tasks import VQVAEDecoder, parse_detections, paste_mask, to_pixels
from ...profiling.profiler import current_rss
from ..draw import DRAW_TASKS
from .engine import Result


def wants_detections(prompt: str) -> bool:
    words = prompt.split()
    return bool(words) and words[0] in DRAW_TASKS


def extension(result: Result, prompt: str, size: tuple[int, int], vae: VQVAEDecoder | None) -> dict[str, Any]:
    """The `paligemma` field of a finished request on an image of `size` (width, height). Blocks (mask decoding):
    called in a worker thread."""
    out: dict[str, Any] = {}
    if wants_detections(prompt):
        out["detections"] = detections(result.text, size, vae)
    rate = result.tokens_per_s
    out["timings"] = {
        "queued_s": round(result.queued_s, 4),
        "ttft_s": round(result.ttft_s, 4),
        "prefill_s": round(result.prefill_s, 4),
        "decode_s": round(result.decode_s, 4),
        "decode_tokens_per_s": None if rate is None else round(rate, 2),
        "cached": result.cached,
    }
    out["memory"] = {"rss_bytes": current_rss()["rss"]}
    return out


def detections(text: str, size: tuple[int, int], vae: VQVAEDecoder | None) -> list[dict[str, Any]]:
    width, height = size
    out = []
    for det in parse_detections(text):
        box = to_pixels(det, width, height)
        mask = None
        if vae is not None and det.seg is not None:
            soft = paste_mask(vae.decode_masks([det.seg])[0], box, width, height)  # (H, W) in [0, 1]
            mask = _png((soft * 255).round().astype(np.uint8))
        out.append({"label": det.label, "box": list(box), "mask": mask})
    return out


def _png(grey: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")  # uint8 (H, W): mode L
    return base64.b64encode(buffer.getvalue()).decode()
