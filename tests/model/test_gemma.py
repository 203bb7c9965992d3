"""The decoder's parts: rope tables against transformers, the KV cache written in place."""

import pytest
import torch

from lowmem_paligemma.model.config import tiny
from lowmem_paligemma.model.gemma import KVCache, rope_tables


def test_rope_tables_equal_transformers_rotary():
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

    hf = Gemma2RotaryEmbedding(Gemma2Config(head_dim=16, rope_theta=10000.0))
    pos = torch.arange(1, 40)[None]
    x = torch.zeros(1, 39, 16)
    want_cos, want_sin = hf(x, pos)
    cos, sin = rope_tables(pos, 16, 10000.0, torch.float32)
    assert torch.equal(cos[:, 0], want_cos) and torch.equal(sin[:, 0], want_sin)


def test_kv_cache_writes_in_place_and_refuses_overflow():
    cfg = tiny(gemma2=True).text
    cache = KVCache(cfg, batch=2, max_len=6, dtype=torch.float32, device="cpu")
    k_storage = cache.k.data_ptr()
    k = torch.randn(2, cfg.num_key_value_heads, 4, cfg.head_dim)
    keys, values = cache.update(1, 0, k, -k)
    assert keys.shape[2] == 4 and torch.equal(keys, k) and torch.equal(values, -k)
    step = torch.randn(2, cfg.num_key_value_heads, 1, cfg.head_dim)
    keys, _ = cache.update(1, 4, step, step)
    assert keys.shape[2] == 5 and torch.equal(keys[:, :, 4:], step) and torch.equal(keys[:, :, :4], k)
    assert cache.k.data_ptr() == k_storage and not cache.k[0].any()  # in place; other layers untouched
    with pytest.raises(ValueError, match="holds 6 positions"):
        cache.update(1, 5, k, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma2_decode_attention_native_equals_torch_path(tiny_pg2_dir, monkeypatch, dtype):
    """A decode step's two products: native_attention.cpp (where it built) against the float32 torch products, on
    the same cache: the same logits up to the order of the sums (and, in bf16, a rounding flipped by it)."""
    from lowmem_paligemma import load_model
    from lowmem_paligemma.formats import native
    from lowmem_paligemma.model import gemma
    from lowmem_paligemma.model.generate import decode_step, encode_image, prefill

    if native.kernels() is None:
        pytest.skip("the native kernels are not available on this machine")
    model = load_model(tiny_pg2_dir, dtype=dtype).model
    cfg = model.cfg
    n = cfg.num_image_tokens + 4
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108, 50, 51, 52]])
    types = torch.cat([torch.zeros(1, n, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)], 1)
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = encode_image(model, pixels)

    def steps(kernels):
        monkeypatch.setattr(gemma, "_native_attention", lambda kv: kernels)
        cache = KVCache(cfg.text, 1, n + 3, model.dtype, "cpu")
        prefill(model, ids[:, :n], types[:, :n], features, cache)
        return torch.stack([decode_step(model, ids, types, n + i, cache) for i in range(3)]).float()

    calls = []

    class Counting:  # the native kernels, counting the calls
        def __getattr__(self, name):
            calls.append(name)
            return getattr(native.kernels(), name)

    ours, torch_path = steps(Counting()), steps(None)
    # every layer of the 3 steps, and the prefill's last layer (`last_only`: one query)
    assert calls.count("attention_scores") == calls.count("attention_values") == 3 * cfg.text.num_hidden_layers + 1
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * torch_path.abs().max().item()
    torch.testing.assert_close(ours, torch_path, rtol=0, atol=tol)
