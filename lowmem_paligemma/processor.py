"""Image -> pixel values and prompt -> token ids / prefix mask, as transformers' PaliGemmaProcessor does (SPEC §4).

Image (SiglipImageProcessor with the PIL backend, Hub `preprocessor_config.json`): convert to RGB with transparency
composited onto white, BICUBIC resize to S x S ignoring the aspect ratio, x / 255, (x - 0.5) / 0.5 -> [-1, 1], CHW.

Prompt: [<image>] * N + [<bos>] + tokens(prompt + "\\n"), token type 0 (one bidirectional prefix block); for training
an optional suffix adds tokens(suffix) + [<eos>] with token type 1 (causal). The prefix and its "\\n" are tokenized
in one call, as PaliGemmaProcessor does, so a prompt ending in "\\n" gives the tokenizer's "\\n\\n" piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import PaliGemmaConfig, load_config

IMAGE_TOKEN = "<image>"


class ImageError(ValueError):
    """A file that is missing or cannot be decoded as an image."""


class TokenizerError(ValueError):
    """A model directory without a loadable tokenizer, or one that does not match the model config."""


def load_image(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such image file")
    try:
        img = Image.open(p)
        img.load()  # decode now: a truncated or corrupt file fails here, not inside preprocessing
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{p}: not a readable image ({e})") from None
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
    resized = to_rgb(img).resize((image_size, image_size), Image.Resampling.BICUBIC)
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
    except (OSError, ValueError, KeyError) as e:
        raise TokenizerError(f"{d}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def build_prompt(
    tokenizer: Any,
    prompt: str,
    num_image_tokens: int,
    image_token_index: int,
    bos_id: int,
    suffix: str | None = None,
    eos_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (1, L), token_type_ids (1, L)) for one image and one prompt (SPEC §4.2)."""
    if IMAGE_TOKEN in prompt:
        raise ValueError(f"the prompt must not contain {IMAGE_TOKEN}: the processor adds the image tokens itself")
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
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id != cfg.image_token_index:
            raise TokenizerError(
                f"{model_dir}: tokenizer {IMAGE_TOKEN} id {image_id} differs from image_token_index "
                f"{cfg.image_token_index} in config.json"
            )
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
