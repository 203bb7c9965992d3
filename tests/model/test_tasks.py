from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lowmem_paligemma.model.tasks import (
    Detection,
    VAEWeightsError,
    VQVAEDecoder,
    draw_detections,
    parse_detections,
    paste_mask,
    to_pixels,
    write_synthetic_vae_npz,
)


def locs(*values: int) -> str:
    return "".join(f"<loc{v:04d}>" for v in values)


def segs(*values: int) -> str:
    return "".join(f"<seg{v:03d}>" for v in values)


BOX = locs(100, 200, 300, 400)
SEG = tuple(range(0, 128, 8))  # 16 codes
GOOD = Detection("dog", (1, 2, 3, 4))
GOOD_TEXT = f"{locs(1, 2, 3, 4)} dog"

# ---------------------------------------------------------------------------------------------------------------------
# Parsing


def test_parse_several_objects_with_multi_word_labels():
    text = f"{BOX} red sports car ; {locs(0, 0, 1023, 1023)} dog ; {locs(5, 6, 7, 8)} traffic light"
    assert parse_detections(text) == [
        Detection("red sports car", (100, 200, 300, 400)),
        Detection("dog", (0, 0, 1023, 1023)),
        Detection("traffic light", (5, 6, 7, 8)),
    ]


def test_parse_segmentation():
    text = f"{BOX}{segs(*SEG)} big cat ; {locs(1, 2, 3, 4)} {segs(*range(16))} dog"
    assert parse_detections(text) == [
        Detection("big cat", (100, 200, 300, 400), SEG),
        Detection("dog", (1, 2, 3, 4), tuple(range(16))),
    ]


def test_parse_without_separator_keeps_labels_with_their_boxes():
    text = f"{BOX} red car {locs(1, 2, 3, 4)}{segs(*SEG)} small dog"
    assert parse_detections(text) == [
        Detection("red car", (100, 200, 300, 400)),
        Detection("small dog", (1, 2, 3, 4), SEG),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("  ;  ; ", []),
        ("no objects here", []),
        # fewer than 4 locs: that object only
        (f"{locs(1, 2, 3)} cat ; {GOOD_TEXT}", [GOOD]),
        # more than 4 locs before the label
        (f"{locs(1, 2, 3, 4, 5)} cat ; {GOOD_TEXT}", [GOOD]),
        # a loc >= 1024, and a loc with the wrong digit count
        (f"{GOOD_TEXT} ; <loc1024>{locs(2, 3, 4)} cat", [GOOD]),
        (f"<loc100>{locs(2, 3, 4)} cat ; {GOOD_TEXT}", [GOOD]),
        # stray text before an object (e.g. an echoed prompt) is dropped, the object kept
        (f"detect dog ; cat\n{GOOD_TEXT}", [GOOD]),
        # stray text between the locs breaks that object
        (f"{locs(1, 2)} oops {locs(3, 4)} cat ; {GOOD_TEXT}", [GOOD]),
        # truncated seg runs: in the middle (next object follows without ';') and at the end
        (f"{BOX}{segs(*range(10))}{GOOD_TEXT}", [GOOD]),
        (f"{GOOD_TEXT} ; {BOX}{segs(*range(7))}", [GOOD]),
        (f"{BOX}{segs(*range(10))} cat ; {GOOD_TEXT}", [GOOD]),
        # too many segs, an out-of-range seg, a seg with the wrong digit count
        (f"{BOX}{segs(*range(17))} cat ; {GOOD_TEXT}", [GOOD]),
        (f"{BOX}{segs(*range(15), 128)} cat ; {GOOD_TEXT}", [GOOD]),
        (f"{BOX}{segs(*range(15))}<seg01> cat ; {GOOD_TEXT}", [GOOD]),
        # a box without a label (generation cut off), here and at the end
        (f"{BOX} ; {GOOD_TEXT} ; {locs(9, 9, 9, 9)}", [GOOD]),
        # another tag inside the label
        (f"{BOX} cat<unk> ; {GOOD_TEXT}", [GOOD]),
        # special tokens are removed, a trailing separator is harmless
        (f"<bos>{GOOD_TEXT} ; <eos><pad>", [GOOD]),
    ],
)
def test_parse_malformed_keeps_only_well_formed(text, expected):
    assert parse_detections(text) == expected


def test_parse_keeps_inverted_box():
    assert parse_detections(f"{locs(300, 400, 100, 200)} cat") == [Detection("cat", (300, 400, 100, 200))]


# ---------------------------------------------------------------------------------------------------------------------
# Box conversion


def test_to_pixels_non_square():
    # 640x480: x scales by 640/1024 = 0.625, y by 480/1024 = 0.46875, then round() (ties to even, as the demo).
    det = Detection("cat", (100, 4, 1023, 1000))
    # x0 = 2.5 -> 2, y0 = 46.875 -> 47, x1 = 625.0 (1023 bins would give 625.6 -> 626), y1 = 479.53 -> 480
    assert to_pixels(det, 640, 480) == (2, 47, 625, 480)
    assert to_pixels((256, 128, 768, 512), 640, 480) == (80, 120, 320, 360)


def test_to_pixels_orders_and_clamps():
    assert to_pixels((768, 512, 256, 128), 640, 480) == (80, 120, 320, 360)
    assert to_pixels((0, 0, 4000, 4000), 640, 480) == (0, 0, 640, 480)
    assert to_pixels((-50, -50, 10, 10), 640, 480) == (0, 0, 6, 5)
    with pytest.raises(ValueError):
        to_pixels(GOOD, 0, 480)


# ---------------------------------------------------------------------------------------------------------------------
# VQ-VAE mask decoder

# docs/model.md, "Segmentation", written out so the synthetic file cannot drift from it.
DECODER_SHAPES = {
    "_vq_vae._embedding": (128, 512),
    "decoder.0.weight": (128, 512, 1, 1),
    "decoder.0.bias": (128,),
    **{
        f"decoder.{b}.net.{i}.{p}": shape
        for b in (2, 3)
        for i, k in ((0, 3), (2, 3), (4, 1))
        for p, shape in (("weight", (128, 128, k, k)), ("bias", (128,)))
    },
    "decoder.4.weight": (128, 128, 4, 4),
    "decoder.4.bias": (128,),
    "decoder.6.weight": (128, 64, 4, 4),
    "decoder.6.bias": (64,),
    "decoder.8.weight": (64, 32, 4, 4),
    "decoder.8.bias": (32,),
    "decoder.10.weight": (32, 16, 4, 4),
    "decoder.10.bias": (16,),
    "decoder.12.weight": (1, 16, 1, 1),
    "decoder.12.bias": (1,),
}


@pytest.fixture(scope="module")
def vae_npz(tmp_path_factory) -> Path:
    return write_synthetic_vae_npz(tmp_path_factory.mktemp("vae") / "vae-oid.npz", seed=0)


@pytest.fixture(scope="module")
def vae(vae_npz) -> VQVAEDecoder:
    return VQVAEDecoder.from_npz(vae_npz)


def reference_decode(arrays: dict[str, np.ndarray], codes: torch.Tensor, transpose_grid=False, flip_kernels=False):
    """The decoder by hand with torch.nn.functional on the raw npz arrays."""
    w = {k: torch.from_numpy(v) for k, v in arrays.items()}
    emb = w["_vq_vae._embedding"]
    x = torch.zeros(codes.shape[0], 512, 4, 4)
    for n in range(codes.shape[0]):
        for k in range(16):  # row-major 4x4 grid
            row, col = (k % 4, k // 4) if transpose_grid else (k // 4, k % 4)
            x[n, :, row, col] = emb[codes[n, k]]

    def conv(x, key, padding=0):
        return F.conv2d(x, w[f"{key}.weight"], w[f"{key}.bias"], padding=padding)

    x = F.relu(conv(x, "decoder.0"))
    for block in ("decoder.2.net", "decoder.3.net"):
        y = F.relu(conv(x, f"{block}.0", padding=1))
        y = F.relu(conv(y, f"{block}.2", padding=1))
        x = x + conv(y, f"{block}.4")
    for key in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):  # [in, out, 4, 4] weights
        weight = w[f"{key}.weight"].flip(2, 3) if flip_kernels else w[f"{key}.weight"]
        x = F.relu(F.conv_transpose2d(x, weight, w[f"{key}.bias"], stride=2, padding=1))
    return conv(x, "decoder.12")[:, 0]


def test_synthetic_npz_has_spec_layout(vae_npz):
    with np.load(vae_npz) as npz:
        shapes = {k: npz[k].shape for k in npz.files}
        assert all(npz[k].dtype == np.float32 for k in npz.files)
    assert {k: v for k, v in shapes.items() if not k.startswith("encoder.")} == DECODER_SHAPES
    assert "encoder.0.weight" in shapes  # so the loader's "ignore the encoder" path is exercised


def test_decoder_shape(vae):
    codes = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    out = vae.decode_masks(codes)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert vae.decode_masks(torch.zeros(0, 16, dtype=torch.long)).shape == (0, 64, 64)


def test_decoder_matches_functional_reference(vae, vae_npz):
    codes = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    with np.load(vae_npz) as npz:
        arrays = {k: npz[k] for k in npz.files}
    out = vae.decode_masks(codes)
    torch.testing.assert_close(out, reference_decode(arrays, codes), rtol=1e-4, atol=1e-4)
    # The check has power: a column-major grid or flipped transposed-conv kernels give other masks.
    for wrong in ({"transpose_grid": True}, {"flip_kernels": True}):
        assert (out - reference_decode(arrays, codes, **wrong)).abs().max() > 0.1


def test_decode_masks_rejects_bad_codes(vae):
    with pytest.raises(ValueError, match="shape"):
        vae.decode_masks(torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0\.\.127"):
        vae.decode_masks(torch.full((1, 16), 128))


def _rewrite(src: Path, dst: Path, drop: str | None = None, **replace: np.ndarray) -> Path:
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files if k != drop}
    arrays.update(replace)
    with dst.open("wb") as f:
        np.savez(f, **arrays)
    return dst


def test_missing_key_names_file_and_key(vae_npz, tmp_path):
    bad = _rewrite(vae_npz, tmp_path / "bad.npz", drop="decoder.6.bias")
    with pytest.raises(VAEWeightsError, match=r"bad\.npz: missing key\(s\) decoder\.6\.bias$") as e:
        VQVAEDecoder.from_npz(bad)
    assert "\n" not in str(e.value)


def test_wrong_shape_and_unexpected_key(vae_npz, tmp_path):
    # Conv-layout [out, in, kh, kw] instead of conv-transpose [in, out, kh, kw].
    swapped = np.zeros((64, 128, 4, 4), np.float32)
    bad = _rewrite(vae_npz, tmp_path / "shape.npz", **{"decoder.6.weight": swapped})
    with pytest.raises(VAEWeightsError, match=r"shape\.npz: key decoder\.6\.weight has shape \[64, 128, 4, 4\]"):
        VQVAEDecoder.from_npz(bad)
    extra = _rewrite(vae_npz, tmp_path / "extra.npz", **{"decoder.14.weight": np.zeros(3, np.float32)})
    with pytest.raises(VAEWeightsError, match=r"extra\.npz: unexpected key\(s\) decoder\.14\.weight"):
        VQVAEDecoder.from_npz(extra)


def test_unreadable_file(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(VAEWeightsError, match=r"junk\.npz: cannot read"):
        VQVAEDecoder.from_npz(junk)
    with pytest.raises(VAEWeightsError, match=r"absent\.npz"):
        VQVAEDecoder.from_npz(tmp_path / "absent.npz")


# ---------------------------------------------------------------------------------------------------------------------
# paste_mask


def test_paste_mask_fills_exactly_the_box():
    out = paste_mask(np.full((64, 64), 5.0), (10, 20, 50, 40), 100, 60)
    assert out.shape == (60, 100) and out.dtype == np.float32
    assert (out[20:40, 10:50] == 1.0).all()
    assert out.sum() == 40 * 20


def test_paste_mask_orientation_and_threshold():
    left = np.where(np.arange(64)[None, :] < 32, 1.0, -1.0) * np.ones((64, 1))  # left half inside
    top = left.T.copy()  # top half inside
    box = (8, 4, 8 + 128, 4 + 32)  # 2x wider, half as tall as the 64x64 mask
    soft = paste_mask(torch.from_numpy(left).float(), box, 200, 50)
    assert soft.max() == 1.0 and soft.min() == 0.0
    # Bilinear, not nearest: box columns 63 and 64 sample the mask at 31.25 and 31.75, between 1.0 and 0.0.
    assert soft[10, 8 + 63] == pytest.approx(0.75) and soft[10, 8 + 64] == pytest.approx(0.25)
    hard = paste_mask(left, box, 200, 50, threshold=0.5)
    assert hard.dtype == bool
    expected = np.zeros((50, 200), bool)
    expected[4:36, 8:72] = True  # bilinear 2x: the boundary falls exactly between box columns 63 and 64
    np.testing.assert_array_equal(hard, expected)
    hard_top = paste_mask(top, box, 200, 50, threshold=0.5)
    expected = np.zeros((50, 200), bool)
    expected[4:20, 8:136] = True
    np.testing.assert_array_equal(hard_top, expected)


def test_paste_mask_clips_to_image_and_handles_empty_box():
    out = paste_mask(np.ones((64, 64)), (-20, -10, 44, 54), 40, 30)
    assert (out == 1.0).all()  # the box covers the whole 40x30 image
    out = paste_mask(np.ones((64, 64)), (30, 20, 60, 50), 40, 30)
    assert out[20:, 30:].all() and out.sum() == 10 * 10
    assert paste_mask(np.ones((64, 64)), (5, 5, 5, 9), 40, 30).sum() == 0
    with pytest.raises(ValueError, match="64"):
        paste_mask(np.ones((32, 32)), (0, 0, 4, 4), 40, 30)


# ---------------------------------------------------------------------------------------------------------------------
# Drawing


def test_draw_detections_writes_png(vae, tmp_path):
    width, height = 320, 200
    image = Image.new("RGB", (width, height), (128, 128, 128))
    text = f"{locs(256, 64, 900, 500)}{segs(*SEG)} striped cat ; {locs(100, 600, 500, 1000)} dog"
    dets = parse_detections(text)
    assert [d.label for d in dets] == ["striped cat", "dog"]
    mask64 = vae.decode_masks([dets[0].seg])[0]
    masks = [paste_mask(mask64, to_pixels(dets[0], width, height), width, height), None]

    with pytest.raises(FileNotFoundError):  # no directory is created on the way
        draw_detections(image, dets, tmp_path / "out" / "dets.png", masks=masks)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    path = draw_detections(image, dets, tmp_path / "out" / "dets.png", masks=masks)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (width, height)
        drawn = np.asarray(png.convert("RGB")).astype(int)
    _, y0, x1, y1 = to_pixels(dets[1], width, height)
    assert (drawn[(y0 + y1) // 2, x1 - 1] != 128).any()  # the dog's right edge is outlined
    assert (drawn[-1, 0] == 128).all()  # far from every box the image is untouched
    inside = masks[0] > 0.5
    assert inside.any() and (drawn[inside] != 128).any(axis=-1).all()  # the cat's mask is tinted

    plain = draw_detections(image, dets, tmp_path / "plain.png")
    with Image.open(plain) as png:
        assert png.size == (width, height)
    with pytest.raises(ValueError, match="2 detections"):
        draw_detections(image, dets, tmp_path / "x.png", masks=[None])
