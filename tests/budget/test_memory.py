"""memory.py: a request's bytes beside the weights, and the pre-flight that counts them before allocating."""

import math

import pytest
import torch

from lowmem_paligemma import defaults
from lowmem_paligemma.budget.memory import kv_cache_bytes, request_bytes
from lowmem_paligemma.checkpoint import loader, preflight
from lowmem_paligemma.errors import ContextLengthError, InsufficientMemoryError
from lowmem_paligemma.model.config import PRESETS, tiny
from lowmem_paligemma.model.gemma import KVCache
from lowmem_paligemma.pretrained.synth import param_shapes
from lowmem_paligemma.runtime.session import LoadOptions, load_session
from lowmem_paligemma.units import format_bytes


@pytest.mark.parametrize("gemma2", [False, True])
def test_kv_cache_bytes_is_what_generate_allocates(gemma2):
    cfg = tiny(gemma2)
    cache = KVCache(cfg.text, 1, 123, torch.bfloat16, "cpu")
    assert kv_cache_bytes(cfg.text, 123, torch.bfloat16) == cache.k.nbytes + cache.v.nbytes


def test_full_size_requests():
    # PaliGemma 2 3B at 896 px: 4,096 image tokens; 26 layers x 4 kv heads x 256 wide, keys and values, bf16.
    cfg = PRESETS["paligemma2-3b-896"]
    assert cfg.num_image_tokens == 4096
    req = request_bytes(cfg, prompt_len=4096 + 10, max_new_tokens=100, dtype=torch.bfloat16)
    assert req.kv_cache == 2 * 26 * 4 * 4206 * 256 * 2
    # (B, N, C, L): 1,024 queries at a time (defaults.ATTENTION_QUERY_CHUNK), a float32 softmax + bf16 copies
    scores = 8 * 1024 * 4106 * (4 + 2)
    assert req.prefill > scores
    assert req.total == max(req.kv_cache + req.prefill, req.vision)
    assert sum(req.parts().values()) == req.total and "KV cache for 4,206 positions" in req.parts()
    small = request_bytes(PRESETS["paligemma2-3b-224"], 266, 100, torch.bfloat16)
    assert small.total < req.total / 10  # the scores grow with the image tokens times the chunk (or their square)


def _tiny_weight_bytes(dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in param_shapes(tiny()).values()) * dtype.itemsize


@pytest.fixture
def little_memory(monkeypatch):
    """Available memory: exactly what the tiny model's weights need, plus 1 MB; loads are recorded."""
    base = _tiny_weight_bytes(torch.bfloat16) + defaults.CHUNK_BYTES + preflight.RUNTIME_MARGIN_BYTES
    monkeypatch.setattr(preflight, "available_bytes", lambda device: base + 1_000_000)
    allocated = []
    original = loader.materialize
    monkeypatch.setattr(loader, "materialize", lambda *a: allocated.append(1) or original(*a))
    return allocated


def test_a_request_that_cannot_fit_is_refused_before_allocation(tiny_pg1_dir, little_memory):
    # 8,000 positions of KV cache: 2 x 4 layers x 1 kv head x 16 wide x 2 bytes each = 2.05 MB, over the 1 MB spare.
    with pytest.raises(InsufficientMemoryError, match=r"KV cache for 8,0\d\d positions 2.0 MB.* shorter request"):
        load_session(tiny_pg1_dir, LoadOptions(), prompt="caption en", max_new_tokens=7980)
    assert little_memory == []
    load_session(tiny_pg1_dir, LoadOptions(), prompt="caption en", max_new_tokens=100)  # a short one fits
    assert little_memory == [1]


def test_a_request_over_the_context_is_refused_before_loading(tiny_pg1_dir, little_memory):
    with pytest.raises(ContextLengthError, match=r"over the model's context of 8192"):
        load_session(tiny_pg1_dir, LoadOptions(preflight=False), prompt="caption en", max_new_tokens=100_000)
    assert little_memory == []


def test_the_kernels_buffers_are_counted_before_allocation(tiny_pg1_dir, monkeypatch):
    # "upcast" widens each 16-bit layer into one shared float32 buffer for a prefill: the largest layer, 4 bytes a
    # weight, held for the model's life (formats/base.Scratch). The pre-flight counts it beside the weights.
    shapes = param_shapes(tiny())
    widest = max(math.prod(s) for k, s in shapes.items() if k.endswith("proj.weight") or "fc" in k)
    base = _tiny_weight_bytes(torch.bfloat16) + defaults.CHUNK_BYTES + preflight.RUNTIME_MARGIN_BYTES
    monkeypatch.setattr(preflight, "available_bytes", lambda device: base + 4 * widest - 1)
    options = LoadOptions(dtype="bfloat16", kernels="dense=linear/upcast")
    with pytest.raises(
        InsufficientMemoryError, match=rf"activations [\d.]+ KB, kernel buffers {format_bytes(4 * widest)}\)"
    ):
        load_session(tiny_pg1_dir, options, prompt="caption en", max_new_tokens=1)
    monkeypatch.setattr(preflight, "available_bytes", lambda device: base + 4 * widest + 10_000_000)
    load_session(tiny_pg1_dir, options, prompt="caption en", max_new_tokens=1)  # the request's few kB fit too
