"""Image -> pixel values and prompt -> token ids / prefix mask, as transformers' PaliGemmaProcessor does.

docs/model.md, "Prompt and tokens", has the layout this follows.

Image (SiglipImageProcessor with the PIL backend, Hub `preprocessor_config.json`): convert to RGB with transparency
composited onto white, BICUBIC resize to S x S ignoring the aspect ratio, x / 255, (x - 0.5) / 0.5 -> [-1, 1], CHW.

Prompt: [<image>] * N + [<bos>] + tokens(prompt + "\\n"), token type 0 (one bidirectional prefix block); for training
an optional suffix adds tokens(suffix) + [<eos>] with token type 1 (causal). The prefix and its "\\n" are tokenized
in one call, as PaliGemmaProcessor does, so a prompt ending in "\\n" gives the tokenizer's "\\n\\n" piece.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError, PromptError, TokenizerError
from .config import PaliGemmaConfig, load_config

IMAGE_TOKEN = "<image>"


def load_image(path: str | Path) -> Image.Image:
    """The decoded image (first frame), or an ImageError: missing, truncated, corrupt, empty or a decompression bomb."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such image file")
    return decode_image(p, str(p))


def decode_image(source: Path | BinaryIO, name: str) -> Image.Image:
    """Open and decode an image file or stream; `name` (its path or URI) goes into the ImageError."""
    try:
        # PIL refuses more than 2 x MAX_IMAGE_PIXELS (about 179 million) but only warns, then decodes, between
        # that and MAX_IMAGE_PIXELS: the warning is made an error for this call so the whole range is refused.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:  # closed on the way out; the decoded first frame stays usable
                img.load()  # decode now: a truncated or corrupt file fails here, not inside preprocessing
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: too many pixels to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL's "cannot identify image file <path or stream repr>" would repeat the name or print an address
        detail = "not a known image format" if isinstance(e, UnidentifiedImageError) else e
        raise ImageError(f"{name}: not a readable image ({detail})") from None
    return check_image(img, name)


def check_image(img: Image.Image, name: object = "the image") -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{name}: the image has no pixels ({img.width}x{img.height})")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    # transformers image_transforms.convert_to_rgb: anything with transparency (RGBA, LA, PA, palette or L with a
    # transparent colour) is alpha-composited onto opaque white; other modes (L, P, CMYK, ...) convert directly.
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """(3, S, S) float32 in [-1, 1], bit-identical to SiglipImageProcessorPil."""
    check_image(img)
    try:  # an image opened but not yet decoded decodes here; some modes have no conversion to RGB
        resized = to_rgb(img).resize((image_size, image_size), Image.Resampling.BICUBIC)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"cannot read the image as RGB (mode {img.mode}: {e})") from None
    # HF rescales in float64 and rounds to float32 once (image_transforms.rescale), then normalises in float32.
    x = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (S, S, 3)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model directory's tokenizer through transformers' AutoTokenizer, from local files only."""
    d = Path(model_dir)
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
        raise TokenizerError(f"{d}: no tokenizer.json or tokenizer.model in the model directory")
    from transformers import AutoTokenizer  # slow import (seconds): only when a tokenizer is needed

    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:
        # AutoTokenizer parses tokenizer_config.json and config.json (user files) and lets TypeError,
        # AttributeError and strict-dataclass errors out on odd values: each is "cannot load", in one line.
        message = str(e).strip().splitlines()
        raise TokenizerError(
            f"{d}: cannot load the tokenizer ({type(e).__name__}: {message[0] if message else ''})"
        ) from None


def check_tokenizer(tokenizer: Any, cfg: PaliGemmaConfig, model_dir: str | Path) -> None:
    """The tokenizer and config.json must agree on the ids the prompt is built from (<image>, <bos>)."""
    for token, want, field in ((IMAGE_TOKEN, cfg.image_token_index, "image_token_index"),
                               ("<bos>", cfg.bos_token_id, "bos_token_id")):  # fmt: skip
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise TokenizerError(f"{model_dir}: tokenizer {token} id {got} differs from {field} {want} in config.json")


def check_prompt(prompt: str, allow_empty: bool = False) -> str:
    """The prompt, or a PromptError: empty, or holding the <image> placeholder that the processor adds itself.

    The model takes an empty prompt (transformers' integration test uses one), but a person typing one
    almost certainly meant something else, so front ends refuse it and the processor allows it.
    """
    if not allow_empty and not prompt.strip():
        raise PromptError('the prompt is empty; try "caption en", "answer en <question>" or "detect cat"')
    if IMAGE_TOKEN in prompt:
        raise PromptError(f"the prompt must not contain {IMAGE_TOKEN}; the image tokens are added for you")
    return prompt


def build_prompt(
    tokenizer: Any,
    prompt: str,
    num_image_tokens: int,
    image_token_index: int,
    bos_id: int,
    suffix: str | None = None,
    eos_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (1, L), token_type_ids (1, L)) for one image and one prompt (docs/model.md, "Prompt and tokens")."""
    check_prompt(prompt, allow_empty=True)
    prefix = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    ids = [image_token_index] * num_image_tokens + [bos_id] + prefix
    types = [0] * len(ids)
    if suffix is not None:
        if eos_id is None:
            raise ValueError("a suffix needs eos_id: it ends with <eos>")
        tail = tokenizer(suffix, add_special_tokens=False)["input_ids"] + [eos_id]
        ids += tail
        types += [1] * len(tail)
    return torch.tensor([ids], dtype=torch.long), torch.tensor([types], dtype=torch.long)


@dataclass
class Processor:
    tokenizer: Any  # a transformers tokenizer (GemmaTokenizer for every PaliGemma checkpoint)
    image_size: int
    num_image_tokens: int
    image_token_index: int
    bos_token_id: int
    eos_token_id: int

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, cfg: PaliGemmaConfig | None = None) -> Processor:
        cfg = cfg if cfg is not None else load_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
        check_tokenizer(tokenizer, cfg, model_dir)
        return cls(
            tokenizer=tokenizer,
            image_size=cfg.vision.image_size,
            num_image_tokens=cfg.num_image_tokens,
            image_token_index=cfg.image_token_index,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_ids[0],
        )

    def prompt_inputs(self, prompt: str, suffix: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (1, L), token_type_ids (1, L)): image tokens, BOS, prompt, "\\n" (+ suffix, EOS)."""
        return build_prompt(
            self.tokenizer, prompt, self.num_image_tokens, self.image_token_index, self.bos_token_id,
            suffix=suffix, eos_id=self.eos_token_id,
        )  # fmt: skip

    def pixel_values(self, image: Image.Image | str | Path) -> torch.Tensor:
        """(1, 3, S, S) float32 in [-1, 1]."""
        img = image if isinstance(image, Image.Image) else load_image(image)
        return preprocess_image(img, self.image_size)[None]

    def __call__(
        self, image: Image.Image | str | Path, prompt: str, suffix: str | None = None
    ) -> dict[str, torch.Tensor]:
        """input_ids (1, L), token_type_ids (1, L), pixel_values (1, 3, S, S)."""
        input_ids, token_type_ids = self.prompt_inputs(prompt, suffix)
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "pixel_values": self.pixel_values(image)}

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = True) -> str:
        # loc/seg tokens are not special: they survive skip_special_tokens=True for detection/segmentation parsing.
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
