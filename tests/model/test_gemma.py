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
