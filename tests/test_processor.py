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
    TextStream,
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


# --- TextStream: the streamed text is the decoded text, in linear time ------------------------------------------

BYTE0 = 109  # <0x00> in the synthetic Gemma vocabulary (synth.tokenizer_vocab)


def _byte(b: int) -> int:
    return BYTE0 + b


def _streamed(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    stream = TextStream(tokenizer, skip_special_tokens)
    return "".join(stream.push(i) for i in ids) + stream.flush()


def test_stream_equals_decode_on_byte_runs_specials_and_loc_tokens(ours_and_hf) -> None:
    tok = ours_and_hf[0].tokenizer
    base = 512  # TINY_BASE_VOCAB: <loc0000>; <seg000> at base + 1024
    cases = {
        # <0x07> alone decodes to "\x07", but followed by <0xC3> the run is invalid and both become U+FFFD: the
        # old stream printed "\x07" and then the whole text again.
        "a valid byte then an invalid one": [300, _byte(0x07), _byte(0xC3), _byte(0x07), 300, 301],
        "a multi-byte character": [300, _byte(0xE6), _byte(0x97), _byte(0xA5), 301],  # 日
        "bytes around a skipped special token": [_byte(0xC3), 1, _byte(0xA9), 2, 302],  # é: <eos> vanishes
        "a byte run at the very end": [300, 301, _byte(0xF0), _byte(0x9F)],
        "loc and seg tokens": [base + 1, base + 1023, base + 1024 + 7, 400, _byte(0x41), base + 2, 1],
        "out-of-vocabulary ids": [300, 1700, _byte(0xC3), 1727, _byte(0xA9), 1700],
        "only specials": [2, 1, 0, 1664],
    }
    for name, ids in cases.items():
        for skip in (True, False):
            assert _streamed(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip), (name, skip)


def test_stream_equals_decode_on_random_tokens(ours_and_hf) -> None:
    tok = ours_and_hf[0].tokenizer
    rng = np.random.default_rng(0)
    specials = [0, 1, 2, 3, 4, 106, 107, 108, 1664]
    for trial in range(400):
        n = int(rng.integers(1, 60))
        kinds = rng.integers(0, 4, n)  # any id (1728 rows: past the vocabulary too), a byte, a special, UTF-8 lead
        ids = [
            int(rng.integers(0, 1728)) if k == 0 else _byte(int(rng.integers(0, 256))) if k == 1
            else int(rng.choice(specials)) if k == 2 else _byte(int(rng.choice([0xC3, 0xE6, 0xF0, 0x80, 0xA9])))
            for k in kinds
        ]  # fmt: skip
        skip = bool(trial % 2)
        assert _streamed(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip), ids


class CountingTokenizer:
    """Passes everything to a tokenizer and counts the ids that `decode` is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls, self.decoded = tokenizer, 0, 0

    def decode(self, ids, **kw):
        self.calls += 1
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_stream_decodes_each_token_about_once(ours_and_hf) -> None:
    # Re-decoding everything at each step (the old stream) is 2,001,000 ids for 2,000 tokens.
    tok = ours_and_hf[0].tokenizer
    rng = np.random.default_rng(1)
    ids = [int(i) if rng.random() < 0.8 else _byte(int(rng.integers(0, 256))) for i in rng.integers(300, 1600, 2000)]
    counting = CountingTokenizer(tok)
    assert _streamed(counting, ids) == tok.decode(ids, skip_special_tokens=True)
    assert counting.decoded == len(ids) and counting.calls <= len(ids)


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
