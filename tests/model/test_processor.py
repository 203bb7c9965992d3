"""processor: our image preprocessing and prompt layout equal transformers' PaliGemmaProcessor (PIL backend)."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowmem_paligemma.model.config import PRESETS, tiny
from lowmem_paligemma.model.processor import (
    ImageError,
    Processor,
    TokenizerError,
    build_prompt,
    load_image,
    load_tokenizer,
    preprocess_image,
)
from lowmem_paligemma.pretrained import synth


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


# --- images that are not what they claim: bombs, empty, huge, unconvertible -----------------------------------------


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A grey PNG built by hand: any declared size, and (for a real bomb) every row of zeros compressed as it goes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    if rows is None:
        row = bytes(width + 1)  # filter byte + one byte per pixel
        data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    else:
        data = z.compress(rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9500, 20000])  # 90 M pixels: PIL only warns and decodes; 400 M: PIL refuses
def test_decompression_bombs_are_image_errors(tmp_path: Path, side: int) -> None:
    assert Image.MAX_IMAGE_PIXELS < side * side
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side) if side < 10000 else _png(side, side, rows=b""))
    assert path.stat().st_size < 200_000  # a few hundred KB that would decode to 90 MB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a warning on the way either
        with pytest.raises(ImageError, match="too many pixels"):
            load_image(path)


def test_empty_images_are_image_errors(tmp_path: Path, ours_and_hf) -> None:
    ours, _ = ours_and_hf
    path = tmp_path / "empty.png"
    path.write_bytes(_png(0, 5, rows=b""))
    with pytest.raises(ImageError):
        load_image(path)
    for size in [(0, 5), (5, 0), (0, 0)]:  # PIL resizes these to black silently
        with pytest.raises(ImageError, match="no pixels"):
            ours.pixel_values(Image.new("RGB", size))


def test_a_huge_image_within_the_limit_works(tmp_path: Path, ours_and_hf) -> None:
    ours, _ = ours_and_hf
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(path, quality=50)
    x = ours.pixel_values(path)
    assert x.shape == (1, 3, 28, 28) and torch.isfinite(x).all()


def test_unconvertible_and_undecoded_images_are_image_errors(tmp_path: Path, ours_and_hf) -> None:
    ours, _ = ours_and_hf
    with pytest.raises(ImageError, match="mode La"):
        ours.pixel_values(Image.new("La", (4, 4)))
    good = tmp_path / "good.png"
    IMAGES["large"].save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:3000])
    lazy = Image.open(cut)  # opened by the caller, not decoded yet: decoding happens in preprocessing
    with pytest.raises(ImageError, match="cannot read the image as RGB"):
        ours.pixel_values(lazy)


@pytest.mark.parametrize("field, value", [("torch_dtype", "x"), ("hidden_size", None), ("torch_dtype", [])])
def test_a_config_the_tokenizer_loader_chokes_on_is_a_tokenizer_error(tiny_pg1_dir: Path, tmp_path: Path, field, value):
    # Fields the model never reads, but AutoTokenizer parses config.json and raises AttributeError, IndexError or
    # strict-dataclass errors on them: each is one TokenizerError line.
    import json
    import shutil

    d = shutil.copytree(tiny_pg1_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="cannot load the tokenizer") as err:
        load_tokenizer(d)
    assert "\n" not in str(err.value)
