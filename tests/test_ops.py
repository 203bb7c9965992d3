"""The CPU-aware linear: same results as F.linear, through the kernel measured fastest."""

import pytest
import torch
import torch.nn.functional as F

from lowmem_paligemma.ops import Linear, linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64), (2, 3, 64)])
def test_linear_matches_f_linear(dtype, shape):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    x = torch.randn(*shape, generator=g).to(dtype)
    got = linear(x, w, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert got.shape == want.shape and got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.15, torch.float16: 0.02}[dtype]
    assert (got.float() - want).abs().max().item() <= tol


@pytest.mark.parametrize("dtype, rows, expect_mv", [
    (torch.bfloat16, 1, True), (torch.bfloat16, 2, False), (torch.float16, 1, False), (torch.float32, 1, False),
])  # fmt: skip
def test_matvec_only_where_measured_faster(monkeypatch, dtype, rows, expect_mv):
    calls = []
    original = torch.mv
    monkeypatch.setattr(torch, "mv", lambda w, v: calls.append(1) or original(w, v))
    Linear(8, 4, bias=False).to(dtype)(torch.randn(1, rows, 8).to(dtype))
    assert calls == ([1] if expect_mv else [])
