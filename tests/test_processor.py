"""processor: our image preprocessing and prompt layout equal transformers' PaliGemmaProcessor (PIL backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowmem_paligemma import synth
from lowmem_paligemma.config import PRESETS, tiny
from lowmem_paligemma.processor import (
    ImageError,
    Processor,
    TokenizerError,
    build_prompt,
    load_image,
    load_tokenizer,
    preprocess_image,
)


def hf_processor(model_dir: Path):
    # Pin the PIL image backend: the torchvision one resizes differently (docs/model.md, "Prompt and tokens").
    from transformers import AutoTokenizer, PaliGemmaProcessor, SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil.from_pretrained(model_dir)
    # The Hub file says "do_convert_rgb": null, which the 5.23 PIL backend reads as False: L/P/RGBA images then fail
    # in normalize ("mean must have 4 elements"). True is the class default and what the Hub models expect.
    image_processor.do_convert_rgb = True
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(model_dir))


def make_images() -> dict[str, Image.Image]:
    rng = np.random.RandomState(0)
    rgb = rng.randint(0, 256, (37, 53, 3), dtype=np.uint8)  # non-square: resized ignoring the aspect ratio
    alpha = np.tile(np.linspace(0, 255, 53).astype(np.uint8), (37, 1))  # partial alpha, 0 (white) to 255
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 3  # one palette index is transparent -> composited onto white
    return {
        "rgb": Image.fromarray(rgb),
        "rgba": Image.fromarray(np.dstack([rgb, alpha])),
        "l": Image.fromarray(rgb[..., 0]),
        "la": Image.fromarray(np.dstack([rgb[..., 0], alpha])),
        "p": palette,
        "p_transparent": transparent_palette,
        "large": Image.fromarray(rng.randint(0, 256, (300, 200, 3), dtype=np.uint8)),
    }


IMAGES = make_images()
PROMPTS = ["caption en", "detect cat ; dog", "", "what is 2+2? héllo 日本", "answer en where is the cow?\n"]


@pytest.fixture(scope="module")
def ours_and_hf(tiny_pg1_dir: Path):
    return Processor.from_pretrained(tiny_pg1_dir), hf_processor(tiny_pg1_dir)


@pytest.mark.parametrize("mode", list(IMAGES))
def test_pixels_equal_transformers(mode: str, ours_and_hf) -> None:
    ours, hf = ours_and_hf
    img = IMAGES[mode]
    ref = hf(images=img, text="caption en", return_tensors="pt")["pixel_values"]
    got = ours(img, "caption en")["pixel_values"]
    assert got.shape == ref.shape == (1, 3, 28, 28) and got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-6
    assert got.min() >= -1 and got.max() <= 1


def test_alpha_composited_onto_white() -> None:
    clear = Image.fromarray(np.zeros((10, 10, 4), dtype=np.uint8))  # fully transparent black
    assert torch.equal(preprocess_image(clear, 14), torch.ones(3, 14, 14))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_transformers(prompt: str, ours_and_hf) -> None:
    ours, hf = ours_and_hf
    ref = hf(images=IMAGES["rgb"], text=prompt, return_tensors="pt")
    got = ours(IMAGES["rgb"], prompt)
    assert got["input_ids"].tolist() == ref["input_ids"].tolist()
    assert got["token_type_ids"].tolist() == ref["token_type_ids"].tolist()
    assert got["input_ids"][0, :17].tolist() == [tiny().image_token_index] * 16 + [2]


@pytest.mark.parametrize("suffix", ["a cat on the beach", "<loc0001><loc0002><loc0100><loc1023> cat"])
def test_suffix_equal_transformers(suffix: str, ours_and_hf) -> None:
    ours, hf = ours_and_hf
    ref = hf(images=IMAGES["rgb"], text="detect cat", suffix=suffix, return_tensors="pt")
    got = ours(IMAGES["rgb"], "detect cat", suffix=suffix)
    assert got["input_ids"].tolist() == ref["input_ids"].tolist()
    assert got["token_type_ids"].tolist() == ref["token_type_ids"].tolist()
    n_suffix = int(got["token_type_ids"].sum())
    assert got["input_ids"][0, -1] == 1 and n_suffix >= 2  # ... suffix tokens, <eos>, all token type 1


def test_empty_prompt_full_layout(tmp_path: Path) -> None:
    # transformers' integration test for google/paligemma-3b-pt-224: [257152] * 256 + [2, 108].
    synth.write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    cfg = PRESETS["paligemma-3b-224"]
    ids, types = build_prompt(tok, "", cfg.num_image_tokens, cfg.image_token_index, cfg.bos_token_id)
    assert ids.tolist() == [[257152] * 256 + [2, 108]] and ids.dtype == torch.long
    assert types.tolist() == [[0] * 258]
    ref = hf_processor(tmp_path)(images=IMAGES["rgb"], text="", return_tensors="pt")
    assert ref["input_ids"].tolist() == ids.tolist()


def test_load_image_from_path(tmp_path: Path, ours_and_hf) -> None:
    ours, _ = ours_and_hf
    path = tmp_path / "img.png"
    IMAGES["rgba"].save(path)
    assert load_image(path).mode == "RGBA"
    assert torch.equal(ours(path, "x")["pixel_values"], ours(IMAGES["rgba"], "x")["pixel_values"])


def test_bad_image_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(text)
    good = tmp_path / "good.png"
    IMAGES["large"].save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(truncated)
    with pytest.raises(ImageError):
        load_image(tmp_path)  # a directory


def test_tokenizer_errors(tmp_path: Path, tiny_pg1_dir: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="image_token_index"):
        Processor.from_pretrained(tiny_pg1_dir, PRESETS["paligemma-3b-224"])  # tiny tokenizer, full-size config


def test_prompt_errors(ours_and_hf) -> None:
    ours, _ = ours_and_hf
    with pytest.raises(ValueError, match="<image>"):
        ours(IMAGES["rgb"], "<image>caption en")
    with pytest.raises(ValueError, match="eos_id"):
        build_prompt(ours.tokenizer, "x", 16, 1664, 2, suffix="y")


def test_decode_keeps_loc_seg(ours_and_hf) -> None:
    ours, _ = ours_and_hf
    base = 512  # TINY_BASE_VOCAB
    ids = torch.tensor([base + 1, base + 2, base + 1024 + 7, 1])
    assert ours.decode(ids) == "<loc0001><loc0002><seg007>"
