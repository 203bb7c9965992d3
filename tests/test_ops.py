"""The CPU-aware linear: same results as F.linear, computed by the measured kernel."""

import pytest
import torch
import torch.nn.functional as F

from lowmem_paligemma.ops import Linear, cpu_gemm_dtype, linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64), (2, 3, 64)])
def test_linear_matches_f_linear(dtype, shape):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    x = torch.randn(*shape, generator=g).to(dtype)
    got = linear(x, w, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert got.shape == want.shape and got.dtype == dtype
    # float16 products with several rows run in bfloat16 on this CPU: bfloat16-sized error, by design.
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.15, torch.float16: 0.15}[dtype]
    assert (got.float() - want).abs().max().item() <= tol


def test_one_token_uses_matvec(monkeypatch):
    calls = []
    original = torch.mv
    monkeypatch.setattr(torch, "mv", lambda w, v: calls.append(1) or original(w, v))
    layer = Linear(8, 4, bias=False)
    layer(torch.randn(1, 1, 8))
    assert calls == [1]
    layer(torch.randn(1, 2, 8))  # a prefill goes through F.linear
    assert calls == [1]


def test_float16_products_run_in_the_measured_dtype(monkeypatch):
    seen = []
    original = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen.append(w.dtype) or original(x, w, b))
    out = linear(torch.randn(3, 8).half(), torch.randn(4, 8).half())
    assert out.dtype == torch.float16 and seen == [cpu_gemm_dtype()]
    assert cpu_gemm_dtype() in (torch.bfloat16, torch.float32)
