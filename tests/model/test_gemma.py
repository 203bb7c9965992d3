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


def _decode_logits(model, steps: int = 3) -> torch.Tensor:
    """The logits of a prefill and `steps` decode steps after it, (steps, V) in float32."""
    from lowmem_paligemma.model.generate import decode_step, encode_image, prefill

    cfg = model.cfg
    n = cfg.num_image_tokens + 4
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108, 50, 51, 52]])
    types = torch.cat([torch.zeros(1, n, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)], 1)
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cache = KVCache(cfg.text, 1, n + steps, model.dtype, "cpu")
    prefill(model, ids[:, :n], types[:, :n], encode_image(model, pixels), cache)
    return torch.stack([decode_step(model, ids, types, n + i, cache) for i in range(steps)]).float()


class _Counting:
    """The native kernels, counting the calls by name."""

    def __init__(self, kernels):
        self.kernels, self.calls = kernels, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.kernels, name)


@pytest.mark.parametrize("which", ["pg1", "pg2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_native_equals_torch_path(tiny_pg1_dir, tiny_pg2_dir, monkeypatch, which, dtype):
    """A decode step's attention: native_attention.cpp (where it built) against torch's (Gemma 1: SDPA; Gemma 2:
    float32 products around the soft cap), on the same cache: the same logits up to the order of the sums (and, in
    bf16, a rounding flipped by it)."""
    from lowmem_paligemma import load_model
    from lowmem_paligemma.formats import native
    from lowmem_paligemma.model import gemma

    if native.kernels() is None:
        pytest.skip("the native kernels are not available on this machine")
    model = load_model(tiny_pg1_dir if which == "pg1" else tiny_pg2_dir, dtype=dtype).model
    counting = _Counting(native.kernels())
    monkeypatch.setattr(gemma, "_native_attention", lambda k, v: counting)
    ours = _decode_logits(model)
    monkeypatch.setattr(gemma, "_native_attention", lambda k, v: None)
    torch_path = _decode_logits(model)
    # every layer of the 3 steps, and the prefill's last layer (`last_only`: one query)
    layers = model.cfg.text.num_hidden_layers
    assert counting.calls.count("attention_scores") == counting.calls.count("attention_values") == 3 * layers + 1
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * torch_path.abs().max().item()
    torch.testing.assert_close(ours, torch_path, rtol=0, atol=tol)


@pytest.mark.parametrize("which", ["pg1", "pg2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_pointwise_native_equals_torch_path(tiny_pg1_dir, tiny_pg2_dir, monkeypatch, which, dtype):
    """A decode step's norms, rotary and gelu * up: native_decode.cpp (where it built) against torch's ops, each
    called once per use, and the same logits up to the fp32 rounding those kernels document."""
    from lowmem_paligemma import load_model
    from lowmem_paligemma.formats import native
    from lowmem_paligemma.model import gemma

    if native.kernels() is None:
        pytest.skip("the native kernels are not available on this machine")
    model = load_model(tiny_pg1_dir if which == "pg1" else tiny_pg2_dir, dtype=dtype).model
    counting = _Counting(native.kernels())
    native_decode = gemma._native_decode
    monkeypatch.setattr(gemma, "_native_decode", lambda x: counting if native_decode(x) is not None else None)
    ours = _decode_logits(model)
    monkeypatch.setattr(gemma, "_native_decode", lambda x: None)
    torch_path = _decode_logits(model)
    cfg = model.cfg.text
    per_layer = 4 if cfg.post_norms else 2
    # 3 steps, and the prefill's one position after its last layer's attention (`last_only`): that layer's norms
    # after the attention, its query's rotary, its MLP, and the final norm
    assert counting.calls.count("rms_norm") == 3 * (per_layer * cfg.num_hidden_layers + 1) + per_layer
    assert counting.calls.count("rope") == 3 * 2 * cfg.num_hidden_layers + 1
    assert counting.calls.count("gelu_tanh_mul_") == 3 * cfg.num_hidden_layers + 1
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * torch_path.abs().max().item()
    torch.testing.assert_close(ours, torch_path, rtol=0, atol=tol)


@pytest.mark.parametrize("dense, wide", [("native/upcast", True), ("native/linear", False)])
def test_prefill_attention_products_widen_with_the_dense_prefill(tiny_pg2_dir, monkeypatch, dense, wide):
    """Gemma 2's prefill score and value products run in float32 (one head at a time) where the dense prefill widens
    to float32, torch's 16-bit bmm elsewhere: the same logits up to the order of the sums (and, in bf16, a rounding
    flipped by it)."""
    from lowmem_paligemma import load_model
    from lowmem_paligemma.model import gemma

    model = load_model(tiny_pg2_dir, dtype=torch.bfloat16, kernels=f"dense={dense}").model
    attention = [m for m in model.modules() if isinstance(m, gemma.GemmaAttention)]
    assert attention and all(m.float32_products == wide for m in attention)
    calls = []
    original = gemma._float32_matmul
    monkeypatch.setattr(gemma, "_float32_matmul", lambda a, b: calls.append(a.shape) or original(a, b))
    ours = _decode_logits(model)
    # scores and values in every prefill layer but the last (`last_only`: one query, the decode path)
    assert len(calls) == (2 * (model.cfg.text.num_hidden_layers - 1) if wide else 0)
    for m in attention:
        m.float32_products = not wide
    other = _decode_logits(model)
    tol = 2e-2 * other.abs().max().item()
    torch.testing.assert_close(ours, other, rtol=0, atol=tol)


def test_float32_products_are_the_16_bit_products_rounded_once():
    from lowmem_paligemma.model.gemma import _float32_matmul

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, 16, generator=g).bfloat16(), torch.randn(2, 3, 16, 7, generator=g).bfloat16()
    got = _float32_matmul(a, b)
    assert got.dtype == torch.bfloat16 and torch.equal(got, (a.float() @ b.float()).bfloat16())
