"""native.py: where the kernels are built."""

import pytest
import torch

from lowmem_paligemma.formats import native


def test_each_checkout_builds_into_its_own_directory(tmp_path, monkeypatch):
    # torch's build files name the source by path: two checkouts sharing a directory would rebuild on every switch.
    here = native.cache_dir()
    for name in native.SOURCES + native.HEADERS:
        (tmp_path / name).write_bytes((native.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path)
    assert native.cache_dir() != here
    assert native.cache_dir() == native.cache_dir()  # and stable for one checkout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, k, g, s, h", [(1, 4, 2, 37, 256), (2, 1, 8, 5, 40), (1, 2, 1, 1, 16), (2, 3, 3, 70, 72)])
def test_decode_attention_products_match_torch(dtype, b, k, g, s, h):
    """native_attention.cpp's two products on views of a cache (heads max_len rows apart, S < max_len), head dims
    that are not a multiple of 16 (the masked tails), one to eight query rows per kv head."""
    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, b, k, s + 9, h, generator=gen).to(dtype)  # (layers, B, K, max_len, H)
    keys, values = cache[1, :, :, :s], cache[0, :, :, :s]
    q = torch.randn(b, k, g, h, generator=gen).to(dtype)
    w = torch.softmax(torch.randn(b, k, g, s, generator=gen), -1).to(dtype)
    scores, out = nk.attention_scores(q, keys), nk.attention_values(w, values)
    assert scores.dtype == out.dtype == torch.float32
    torch.testing.assert_close(scores, q.float() @ keys.float().transpose(2, 3), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, w.float() @ values.float(), rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_a_view_it_cannot_read():
    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    keys = torch.randn(1, 2, 16, 8).transpose(2, 3)  # (B, K, S=8, H=16) with S and H swapped in memory
    with pytest.raises(RuntimeError, match="dense"):
        nk.attention_scores(torch.randn(1, 2, 1, 16), keys)
