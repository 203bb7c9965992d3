"""Detection and segmentation outputs: parse the text, decode the masks, draw the result.

The formats are docs/model.md, "Output formats".

What is special here:
* PaliGemma answers `detect`/`segment` prompts with text, one object per `" ; "`-separated entry:
  `<locY0><locX0><locY1><locX1>[<seg000>..x16] label`. Boxes are in 1024 bins of the *square* model input,
  so they are normalised coordinates of the original image, whatever its aspect ratio.
* `parse_detections` never raises on model output: a malformed object is skipped and the others are kept
  (the exact rules are in its docstring).
* The 16 `<seg>` codes index the 128x512 codebook of big_vision's VQ-VAE (`vae-oid.npz`). `VQVAEDecoder` is
  the decoder half, with module names equal to the npz keys, so loading is a checked identity copy.

Axis legend: N: objects, C: channels, H/W: height/width in pixels.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..errors import VAEWeightsError

logger = logging.getLogger(__name__)

NUM_LOC_BINS = 1024  # <loc0000>..<loc1023>
CODEBOOK_SIZE = 128  # <seg000>..<seg127>
CODE_DIM = 512  # width of one codebook entry
CODES_PER_MASK = 16  # a row-major 4x4 grid of codes
MASK_SIZE = 64  # the decoder upsamples 4x4 -> 64x64

# ---------------------------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class Detection:
    label: str
    box: tuple[int, int, int, int]  # (y0, x0, y1, x1) loc bins 0..1023, the order the model writes them
    seg: tuple[int, ...] | None = None  # 16 codebook ids 0..127 (row-major 4x4) for `segment`; None for `detect`


# One alternative per token kind; together they cover every character, so scanning never stalls.
_TOKEN_RE = re.compile(r"<(?P<tag>loc|seg)(?P<num>[0-9]+)>|(?P<sep>;)|(?P<text>[^<>;]+)|(?P<bad><[^<>;]*>?|>)")
# Special tokens a caller may leave in by decoding without skip_special_tokens; they carry no object.
_SPECIAL_RE = re.compile(r"<(?:bos|eos|pad|image)>")


def parse_detections(text: str) -> list[Detection]:
    """Objects in a `detect`/`segment` answer, in output order.

    The text is split into entries at every `;` and, when the separator is missing, before a `<loc>` that
    follows anything but another `<loc>`. `<bos>`, `<eos>`, `<pad>`, `<image>` are removed first and
    whitespace between tags is ignored. An entry is kept only if it is exactly
        4 x `<locNNNN>` (four digits, value <= 1023)
        then 0 or 16 x `<segNNN>` (three digits, value <= 127)
        then a non-empty label (stripped; may have several words; no `<`, `>`, `;`).
    Anything else is skipped whole and logged at DEBUG: fewer or more than 4 locs, an out-of-range or
    mis-formatted loc/seg, a seg run of another length (a truncated generation), a box without a label,
    stray text before the first `<loc>` of an entry (e.g. an echoed prompt) or any other `<...>` tag.
    Empty entries (`"; ;"`, a trailing `;`, the empty string) are not objects and are ignored silently.
    Geometry is not judged here: an inverted box is kept and `to_pixels` orders its corners.
    """
    text = _SPECIAL_RE.sub("", text)
    entries: list[list[tuple[str, str]]] = [[]]  # each token is (kind, value)
    for m in _TOKEN_RE.finditer(text):
        if m["sep"]:
            entries.append([])
            continue
        if m["tag"]:
            kind, value = m["tag"], m["num"]
            # A loc after a label/seg/stray text starts the next object: the model forgot the " ; ".
            if kind == "loc" and any(k != "loc" for k, _ in entries[-1]):
                entries.append([])
        elif m["text"] is not None:
            if not m["text"].strip():
                continue  # whitespace between tags
            kind, value = "text", m["text"]
        else:
            kind, value = "bad", m["bad"]
        entries[-1].append((kind, value))

    dets = []
    for entry in entries:
        if not entry:
            continue
        det = _parse_entry(entry)
        if det is None:
            logger.debug("skipping malformed object %r", "".join(_render(t) for t in entry))
        else:
            dets.append(det)
    return dets


def _render(token: tuple[str, str]) -> str:
    kind, value = token
    return f"<{kind}{value}>" if kind in ("loc", "seg") else value


def _parse_entry(entry: list[tuple[str, str]]) -> Detection | None:
    n_loc = next((i for i, (k, _) in enumerate(entry) if k != "loc"), len(entry))
    locs, rest = entry[:n_loc], entry[n_loc:]
    n_seg = next((i for i, (k, _) in enumerate(rest) if k != "seg"), len(rest))
    segs, rest = rest[:n_seg], rest[n_seg:]
    if len(locs) != 4 or len(segs) not in (0, CODES_PER_MASK) or any(k != "text" for k, _ in rest):
        return None
    if any(len(v) != 4 or int(v) >= NUM_LOC_BINS for _, v in locs):
        return None
    if any(len(v) != 3 or int(v) >= CODEBOOK_SIZE for _, v in segs):
        return None
    label = "".join(v for _, v in rest).strip()
    if not label:
        return None
    y0, x0, y1, x1 = (int(v) for _, v in locs)
    seg = tuple(int(v) for _, v in segs) if segs else None
    return Detection(label=label, box=(y0, x0, y1, x1), seg=seg)


def to_pixels(det: Detection | tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel edges on the original width x height image: slice as `img[y0:y1, x0:x1]`.

    Bins are divided by 1024 and rounded with Python's `round` (ties to even), exactly as Google's demo
    (`paligemma_parse.py::extract_objs`, docs/model.md, "Detection"); big_vision's evaluator divides by 1023
    (Δ <= 0.1 %).
    The result is clamped to the image and its corners ordered, so x0 <= x1 and y0 <= y1 always.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    y0, x0, y1, x1 = det.box if isinstance(det, Detection) else det
    x0, x1 = (min(max(round(v / NUM_LOC_BINS * width), 0), width) for v in (x0, x1))
    y0, y1 = (min(max(round(v / NUM_LOC_BINS * height), 0), height) for v in (y0, y1))
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation mask decoder (big_vision `get_reconstruct_masks`, docs/model.md, "Segmentation")

_EMBEDDING_KEY = "_vq_vae._embedding"


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # `net.{0,2,4}` are the npz keys; 1 and 3 are the ReLUs.
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class VQVAEDecoder(nn.Module):
    """16 codebook ids per object -> a 64x64 mask logit map in about [-1, 1] (> 0 means inside).

    Build with `VQVAEDecoder.from_npz(path)`; `__init__` only declares parameters (meta-safe).
    """

    def __init__(self) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(CODEBOOK_SIZE, CODE_DIM))  # npz key `_vq_vae._embedding`
        # Indices are the npz keys `decoder.{i}`. flax ConvTranspose(4x4, s2, padding=2, transpose_kernel=True)
        # equals torch ConvTranspose2d(k4, s2, p1) on the npz's [in, out, kh, kw] weight (verified numerically;
        # docs/model.md, "Segmentation").
        self.decoder = nn.Sequential(
            nn.Conv2d(CODE_DIM, 128, 1),  # 0
            nn.ReLU(),
            _ResBlock(128),  # 2
            _ResBlock(128),  # 3
            nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1),  # 4: 4x4 -> 8x8
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1),  # 6: -> 16x16
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # 8: -> 32x32
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),  # 10: -> 64x64
            nn.ReLU(),
            nn.Conv2d(16, 1, 1),  # 12
        )

    def checkpoint_params(self) -> dict[str, nn.Parameter]:
        """Parameters by their npz key."""
        params = {f"decoder.{name}": p for name, p in self.decoder.named_parameters()}
        params[_EMBEDDING_KEY] = self.codebook
        return params

    @classmethod
    def from_npz(cls, path: str | Path) -> VQVAEDecoder:
        """Load `vae-oid.npz`; weights in PyTorch layout: conv [out, in, kh, kw], conv-transpose [in, out, kh, kw].

        Only `_vq_vae._embedding` and `decoder.*` are read; `encoder.*` and other `_vq_vae.*` arrays (EMA
        statistics) belong to the mask->codes direction and are ignored. A missing, unexpected `decoder.*`,
        mis-shaped or non-float array raises `VAEWeightsError` naming the file and the key.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                if not isinstance(npz, np.lib.npyio.NpzFile):
                    raise VAEWeightsError(f"{path}: not an .npz archive")
                arrays = {k: npz[k] for k in npz.files if k == _EMBEDDING_KEY or k.startswith("decoder.")}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            if isinstance(e, VAEWeightsError):
                raise
            raise VAEWeightsError(f"{path}: cannot read as .npz: {e}") from None

        # Build on meta so nothing is initialised twice; the real bytes come from the npz.
        with torch.device("meta"):
            model = cls()
        model = model.to_empty(device="cpu")
        params = model.checkpoint_params()
        missing = sorted(set(params) - set(arrays))
        unexpected = sorted(set(arrays) - set(params))
        if missing:
            raise VAEWeightsError(f"{path}: missing key(s) {', '.join(missing)}")
        if unexpected:
            raise VAEWeightsError(f"{path}: unexpected key(s) {', '.join(unexpected)}")
        for key, p in params.items():  # check everything before copying anything
            a = arrays[key]
            if tuple(a.shape) != tuple(p.shape):
                raise VAEWeightsError(f"{path}: key {key} has shape {list(a.shape)}, expected {list(p.shape)}")
            if not np.issubdtype(a.dtype, np.floating):
                raise VAEWeightsError(f"{path}: key {key} has dtype {a.dtype}, expected a float type")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)))
        return model.eval()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        # codes (N, 16) int -> mask logits (N, 64, 64)
        n = codes.shape[0]
        x = self.codebook[codes]  # (N, 16, 512)
        x = x.view(n, 4, 4, CODE_DIM).permute(0, 3, 1, 2)  # (N, 512, 4, 4): code k sits at row k // 4, col k % 4
        return self.decoder(x)[:, 0]  # (N, 1, 64, 64) -> (N, 64, 64)

    @torch.no_grad()
    def decode_masks(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, 16) codebook ids -> (N, 64, 64) float32 mask logits in about [-1, 1]."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.codebook.device)
        if codes.ndim != 2 or codes.shape[1] != CODES_PER_MASK:
            raise ValueError(f"codes must have shape [N, {CODES_PER_MASK}], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
            raise ValueError(f"codes must be in 0..{CODEBOOK_SIZE - 1}, got {codes.min()}..{codes.max()}")
        return self(codes)


def paste_mask(
    mask64: np.ndarray | torch.Tensor,
    box_pixels: tuple[int, int, int, int],
    width: int,
    height: int,
    threshold: float | None = None,
) -> np.ndarray:
    """Place one decoded 64x64 mask into its (x0, y0, x1, y1) box of a width x height image -> (H, W).

    As Google's demo (docs/model.md, "Segmentation"): `clip(m * 0.5 + 0.5, 0, 1)`, PIL bilinear resize to the box,
    zeros outside.
    The resize runs on float32 (mode "F") rather than the demo's uint8, so there is no 1/255 quantisation.
    Returns the soft mask (float32 in [0, 1]) or, with `threshold`, the bool mask `soft > threshold`;
    0.5 is the decoder's own boundary (big_vision's evaluator keeps raw output > 0.0).
    A box reaching outside the image is resized whole and then cropped; an empty box gives an empty mask.
    """
    m = mask64.detach().cpu().numpy() if isinstance(mask64, torch.Tensor) else np.asarray(mask64)
    if m.shape != (MASK_SIZE, MASK_SIZE):
        raise ValueError(f"mask64 must have shape [{MASK_SIZE}, {MASK_SIZE}], got {list(m.shape)}")
    out = np.zeros((height, width), np.float32)
    x0, y0, x1, y1 = (int(v) for v in box_pixels)
    if x1 > x0 and y1 > y0:
        m = np.clip(m.astype(np.float32) * 0.5 + 0.5, 0.0, 1.0)
        resized = np.asarray(Image.fromarray(m, mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
        # Intersection of the box with the image, in image and in box coordinates.
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if ix1 > ix0 and iy1 > iy0:
            out[iy0:iy1, ix0:ix1] = resized[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    return out if threshold is None else out > threshold


# ---------------------------------------------------------------------------------------------------------------------
# Drawing

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]  # fmt: skip
_MASK_ALPHA = 0.45  # opacity of a fully-on mask pixel


def draw_detections(
    image: Image.Image,
    dets: Sequence[Detection],
    path: str | Path,
    masks: Sequence[np.ndarray | None] | None = None,
) -> Path:
    """Write a PNG of `image` with each box, its label and (optionally) its mask; returns the path.

    `masks[i]` belongs to `dets[i]`: an (H, W) bool or [0, 1] float array as `paste_mask` returns, or None.
    """
    path = Path(path)
    width, height = image.size
    if masks is not None and len(masks) != len(dets):
        raise ValueError(f"got {len(masks)} masks for {len(dets)} detections")
    canvas = image.convert("RGBA")
    for i, mask in enumerate(masks or []):
        if mask is None:
            continue
        if mask.shape != (height, width):
            raise ValueError(f"mask {i} has shape {list(mask.shape)}, expected [{height}, {width}] (the image size)")
        alpha = (np.clip(mask.astype(np.float32), 0.0, 1.0) * (255 * _MASK_ALPHA)).round().astype(np.uint8)
        layer = Image.new("RGBA", (width, height), _PALETTE[i % len(_PALETTE)] + (0,))
        layer.putalpha(Image.fromarray(alpha, mode="L"))
        canvas = Image.alpha_composite(canvas, layer)
    canvas = canvas.convert("RGB")

    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, min(width, height) // 30))  # bitmap fallback without FreeType
    line = max(2, min(width, height) // 200)
    for i, det in enumerate(dets):
        color = _PALETTE[i % len(_PALETTE)]
        x0, y0, x1, y1 = to_pixels(det, width, height)
        draw.rectangle((x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)), outline=color, width=line)
        # Label on a filled tag above the box, or just inside it when the box touches the top edge.
        left, top, right, bottom = draw.textbbox((0, 0), det.label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y0 - th if y0 - th >= 0 else y0
        draw.rectangle((x0, ty, x0 + tw, ty + th), fill=color)
        text_color = (0, 0, 0) if sum(color) > 400 else (255, 255, 255)
        draw.text((x0 + 2 - left, ty + 2 - top), det.label, fill=text_color, font=font)
    canvas.save(path, format="PNG")  # into an existing directory: none is created
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic weights (the real vae-oid.npz cannot be downloaded in tests)


_CONV_T_KEYS = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")


def _vae_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {_EMBEDDING_KEY: (CODEBOOK_SIZE, CODE_DIM)}

    def conv(key: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (cout, cin, k, k), (cout,)

    def conv_t(key: str, cin: int, cout: int) -> None:
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (cin, cout, 4, 4), (cout,)  # [in, out, kh, kw]

    def resblock(key: str, dim: int) -> None:
        conv(f"{key}.net.0", dim, dim, 3)
        conv(f"{key}.net.2", dim, dim, 3)
        conv(f"{key}.net.4", dim, dim, 1)

    conv("decoder.0", 128, CODE_DIM, 1)
    resblock("decoder.2", 128)
    resblock("decoder.3", 128)
    for key, cin, cout in zip(_CONV_T_KEYS, (128, 128, 64, 32), (128, 64, 32, 16), strict=True):
        conv_t(key, cin, cout)
    conv("decoder.12", 1, 16, 1)
    # The encoder (mask -> codes) is not used here; its keys are written so the loader's "ignore" path is
    # exercised. Channels 1->16->32->64->128 with 4x4 kernels, then 128->512 (docs/model.md, "Segmentation",
    # inferred from the file size).
    for key, cin, cout in [("encoder.0", 1, 16), ("encoder.2", 16, 32), ("encoder.4", 32, 64), ("encoder.6", 64, 128)]:
        conv(key, cout, cin, 4)
    resblock("encoder.8", 128)
    resblock("encoder.9", 128)
    conv("encoder.10", CODE_DIM, 128, 1)
    return shapes


def write_synthetic_vae_npz(path: str | Path, seed: int = 0) -> Path:
    """Write random weights with the exact key layout and shapes of `vae-oid.npz` (float32)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in _vae_shapes().items():
        if key == _EMBEDDING_KEY:
            a = rng.standard_normal(shape)
        elif key.endswith(".bias"):
            a = 0.1 * rng.standard_normal(shape)  # non-zero so a swapped or dropped bias changes the output
        else:
            # Conv [out, in, kh, kw]: fan-in = in * kh * kw. Conv-transpose [in, out, 4, 4] with stride 2:
            # each output pixel sees in * (4 / 2)^2 taps.
            is_conv_t = key.removesuffix(".weight") in _CONV_T_KEYS
            fan_in = shape[0] * 4 if is_conv_t else int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)  # He init keeps activations O(1) through ReLUs
        arrays[key] = a.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object stops np.savez from appending ".npz" to the name
        np.savez(f, **arrays)
    return path
