"""Every kernel the chooser can pick computes what the reference does: F.linear on the (dequantized) weight."""

import pytest
import torch
import torch.nn.functional as F

from lowmem_paligemma.formats import int4, int8, native, registry
from lowmem_paligemma.formats.base import DECODE_ROWS, KernelChoice, Scratch
from lowmem_paligemma.formats.dense import Linear, dense_linear, pack_weight
from lowmem_paligemma.formats.int8 import int8_linear
from lowmem_paligemma.formats.kernels import use_kernels

# bf16 products round each output to 8 bits of mantissa after accumulating in float32.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.abs().max().item() + 1e-6
    assert (got.float() - want).abs().max().item() <= TOL[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [(1, 1), (1,), (2, 3), (DECODE_ROWS,), (DECODE_ROWS + 1,), (40,)])
@pytest.mark.parametrize("i", [64, 37])  # in-features that are not a multiple of 16: the vector kernels' tails
@pytest.mark.parametrize(
    "name", sorted(set(registry.get("dense").decode_kernels) | set(registry.get("dense").prefill_kernels))
)
def test_dense_kernels_match_f_linear(dtype, rows, i, name):
    if name not in registry.get("dense").available_kernels(dtype):
        pytest.skip(f"{name} is not available for {dtype} on this machine")
    if name == "packed" and i % 16:
        pytest.skip("oneDNN's packed layout is chosen for the model's widths only")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, i, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    x = torch.randn(*rows, i, generator=g).to(dtype)
    weight = pack_weight(w) if name == "packed" else w
    got = dense_linear(x, weight, b, KernelChoice(name, name), Scratch())
    assert got.shape == (*rows, 48) and got.dtype == dtype
    _close(got, F.linear(x.float(), w.float(), b.float()), dtype)


def test_mv_is_used_only_for_one_row(monkeypatch):
    calls = []
    original = torch.mv
    monkeypatch.setattr(torch, "mv", lambda w, v: calls.append(1) or original(w, v))
    layer = Linear(8, 4, bias=False).to(torch.bfloat16)
    layer.kernels = KernelChoice("mv", "linear")
    layer(torch.randn(1, 1, 8).to(torch.bfloat16))
    layer(torch.randn(1, 2, 8).to(torch.bfloat16))
    assert calls == [1]


# Odd shapes included: in-features that are not a multiple of 16 must not reach the packed kernels (they crash).
INT8_SHAPES = [(48, 64), (7, 13), (33, 4304 // 8), (64, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_in", INT8_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, DECODE_ROWS + 5])
@pytest.mark.parametrize("name", registry.get("int8").available_kernels(torch.bfloat16))
def test_int8_kernels_match_dequantized_linear(dtype, out_in, rows, name):
    o, i = out_in
    g = torch.Generator().manual_seed(1)
    q, scale = int8.quantize_int8(torch.randn(o, i, generator=g), dtype)
    b = torch.randn(o, generator=g).to(dtype)
    x = torch.randn(2, rows, i, generator=g).to(dtype)
    got = int8_linear(x, q, scale, b, KernelChoice(name, name), Scratch())
    want = F.linear(x.float(), q.float() * scale.float()[:, None], b.float())
    assert got.shape == (2, rows, o) and got.dtype == dtype
    decode = rows * 2 <= DECODE_ROWS
    # where they run (else an exact kernel): activations quantized too, ~1/127 of x (of each block's max)
    rounds_x = {"int_mm": i % 8 == 0 and not decode, "amx": o % 16 == 0 and not decode}
    rounds_x["maddubs"] = rounds_x["vnni"] = i % 32 == 0 if decode else o % 16 == 0
    if rounds_x.get(name):
        assert (got.float() - want).abs().max().item() <= 0.03 * want.abs().max().item()
    else:
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_in", [(16, 128), (48, 256), (64, 384)])
@pytest.mark.parametrize("rows", [1, 3, DECODE_ROWS + 5])
def test_int4_layer_matches_dequantized_linear(dtype, out_in, rows):
    o, i = out_in
    g = torch.Generator().manual_seed(2)
    w = torch.randn(o, i, generator=g)
    layer = int4.Int4Linear(i, o, bias=True).to(dtype)
    layer._fill(w, 0)
    layer.bias.data = torch.randn(o, generator=g).to(dtype)
    q, scale = int4.quantize_int4(w, dtype)
    dense = (q.float().view(o, i // int4.GROUP, -1) * scale.float()[..., None]).view(o, i)
    torch.testing.assert_close(registry.dequantize(layer), dense, rtol=0, atol=1e-6)
    x = torch.randn(rows, i, generator=g).to(dtype)
    got = layer(x)
    assert got.dtype == dtype
    _close(got, F.linear(x.float(), dense, layer.bias.float()), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, DECODE_ROWS, DECODE_ROWS + 1])
@pytest.mark.parametrize("name", registry.get("int4").available_kernels(torch.bfloat16))
def test_int4_kernels_match_dequantized_linear(dtype, rows, name):
    o, i = 48, 384
    g = torch.Generator().manual_seed(3)
    w = torch.randn(o, i, generator=g)
    layer = int4.Int4Linear(i, o, bias=False).to(dtype)
    layer._fill(w, 0)
    layer.kernels = KernelChoice(name, name)
    dense = registry.dequantize(layer)
    x = torch.randn(rows, i, generator=g).to(dtype)
    got, want = layer(x), F.linear(x.float(), dense)
    # activations quantized too: blocks of 32 (prefill 128), ~1/254 of each block's max ("amx": a prefill only)
    if name in int4.DOT_KERNELS or (name == "amx" and rows > DECODE_ROWS):
        assert (got.float() - want).abs().max().item() <= 0.03 * want.abs().max().item()
    else:
        _close(got, want, dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_amx_prefill_runs_native_amx_gemm(fmt):
    """An "amx" choice runs native_amx_gemm.cpp for a prefill (its bits, which are the "vnni" prefill's), and an
    exact kernel for a decode step (it has none), on the machines that offer it."""
    if "amx" not in registry.get(fmt).available_kernels(torch.bfloat16):
        pytest.skip("no AMX kernels on this machine")
    nk, g = native.kernels(), torch.Generator().manual_seed(5)
    w, x = torch.randn(48, 256, generator=g), torch.randn(2, 20, 256, generator=g).bfloat16()
    choice = KernelChoice("amx", "amx")
    if fmt == "int8":
        q, scale = int8.quantize_int8(w, torch.bfloat16)
        run = lambda rows: int8_linear(rows, q, scale, None, choice, Scratch())  # noqa: E731
        gemm, vnni = nk.gemm_int8_amx(x.view(40, 256), q, scale), nk.gemm_int8_vnni(x.view(40, 256), q, scale)
        dense = q.float() * scale.float()[:, None]
    else:
        packed, scale = int4.quantize_int4_packed(w, torch.bfloat16, int4.GROUP)
        run = lambda rows: int4.int4_linear(rows, packed, scale, int4.GROUP, None, choice, Scratch())  # noqa: E731
        gemm = nk.gemm_int4_amx(x.view(40, 256), packed, scale, int4.GROUP)
        vnni = nk.gemm_int4_vnni(x.view(40, 256), packed, scale, int4.GROUP)
        dense = int4.dequantize_int4(packed, scale, int4.GROUP, torch.empty(48, 256))
    assert torch.equal(gemm, vnni)
    assert torch.equal(run(x), gemm.view(2, 20, 48))
    _close(run(x[0, :3]), F.linear(x[0, :3].float(), dense), torch.bfloat16)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_avx2_integer_prefill_runs_native_dot_gemm(fmt):
    """A "maddubs" choice runs native_dot_gemm.cpp for a prefill (its bits, not a quietly exact fallback) and
    native_dot.cpp's decode for a step, on the machines that offer it."""
    if "maddubs" not in registry.get(fmt).available_kernels(torch.bfloat16):
        pytest.skip("no AVX2 integer kernels on this machine")
    nk, g = native.kernels(), torch.Generator().manual_seed(4)
    w, x = torch.randn(48, 256, generator=g), torch.randn(2, 20, 256, generator=g).bfloat16()
    choice = KernelChoice("maddubs", "maddubs")
    if fmt == "int8":
        q, scale = int8.quantize_int8(w, torch.bfloat16)
        run = lambda rows: int8_linear(rows, q, scale, None, choice, Scratch())  # noqa: E731
        gemm, gemv = nk.gemm_int8_dot(x.view(40, 256), q, scale), nk.gemv_int8_dot(x[0, :3], q, scale)
    else:
        packed, scale = int4.quantize_int4_packed(w, torch.bfloat16, int4.GROUP)
        run = lambda rows: int4.int4_linear(rows, packed, scale, int4.GROUP, None, choice, Scratch())  # noqa: E731
        gemm = nk.gemm_int4_dot(x.view(40, 256), packed, scale, int4.GROUP)
        gemv = nk.gemv_int4_dot(x[0, :3], packed, scale, int4.GROUP)
    assert torch.equal(run(x), gemm.view(2, 20, 48)) and torch.equal(run(x[0, :3]), gemv)


def test_a_tied_table_under_a_layout_choice_takes_the_plain_layouts_kernels(monkeypatch):
    """The embedding is never packed (its rows are gathered): under "packed/packed" its logits run our decode kernel
    where it built (not F.linear, which read the 257k-row table at half the rate) and F.linear for a prefill."""
    from lowmem_paligemma.formats.dense import Embedding

    dense = registry.get("dense")
    table = Embedding(64, 32).to(torch.bfloat16)
    table.weight.data.normal_(generator=torch.Generator().manual_seed(0))
    use_kernels(table, {"dense": KernelChoice("packed", "packed")})
    want = "native" if "native" in dense.available_kernels(torch.bfloat16) else "linear"
    assert table.kernels == KernelChoice(want, "linear") and not table.weight.is_mkldnn
    use_kernels(table, {"dense": KernelChoice("mv", "upcast")})
    assert table.kernels == KernelChoice("mv", "upcast")  # a plain layout's choice is kept as it is
    use_kernels(table, {"dense": KernelChoice("packed", "packed")})
    x = torch.randn(1, 32).to(torch.bfloat16)
    _close(table.logits(x), F.linear(x.float(), table.weight.float()), torch.bfloat16)


def test_streamed_layers_keep_the_plain_layout():
    """A layer on meta (streamed per forward, residency.py) is not reordered into a layout its bytes arrive
    without each pass: it takes the reference kernels where the choice needs a layout, and stays on meta."""
    from torch import nn

    try:
        pack_weight(torch.zeros(16, 16))
    except (RuntimeError, AttributeError):
        pytest.skip("oneDNN cannot pack weights on this machine")
    model = nn.Sequential(Linear(16, 16), Linear(16, 16))
    with torch.device("meta"):
        model[1] = Linear(16, 16)
    use_kernels(model, {"dense": KernelChoice("mv", "linear")})
    assert model[0].kernels == model[1].kernels == KernelChoice("mv", "linear")
    use_kernels(model, {"dense": KernelChoice("packed", "packed")})
    assert model[0].weight.is_mkldnn and model[0].kernels == KernelChoice("packed", "packed")
    assert model[1].weight.is_meta and model[1].kernels == registry.get("dense").reference


@pytest.mark.parametrize(
    "quantize, spec", [(None, "dense=native/upcast"), ("int8", "int8=native/dequant,dense=native/linear")]
)
def test_native_kernels_give_the_reference_tokens_in_float32(tiny_pg2_dir, quantize, spec):
    """Greedy tokens identical to the reference kernels' in float32 (the chooser may pick ours: they must not change
    an answer beyond the order of the sums)."""
    from lowmem_paligemma import load_model
    from lowmem_paligemma.model.generate import generate

    if "native" not in registry.get("dense").available_kernels(torch.float32):
        pytest.skip("the native kernels are not available on this machine")
    ref = load_model(tiny_pg2_dir, dtype=torch.float32, quantize=quantize, kernels="reference").model
    ours = load_model(tiny_pg2_dir, dtype=torch.float32, quantize=quantize, kernels=spec).model
    cfg = ref.cfg
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108]])
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    run = lambda m: list(generate(m, ids, pixel_values=pixels, max_new_tokens=16, eos_token_ids=[]))  # noqa: E731
    assert run(ours) == run(ref)


@pytest.mark.parametrize("offset", [0, 3])  # 3: an output that does not start on a cache line (plain stores)
def test_native_widening_and_int4_unpacking_are_exact(offset):
    # The "upcast" prefills' float32 weights (dense: widen_float32; int4: dequantize_int4 into float32) must be the
    # very values torch's conversions give, whatever the size (tails of n % 16) and the output's alignment.
    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(37, 13, generator=g) * 100).to(dtype)
        out = torch.empty(offset + w.numel())[offset:].view(w.shape)
        nk.widen_float32(w, out)
        assert torch.equal(out, w.float())
    w = torch.randn(48, 256, generator=g)
    packed, scale = int4.quantize_int4_packed(w, torch.bfloat16, 128)
    out = torch.empty(offset + w.numel())[offset:].view(w.shape)
    nk.dequantize_int4(packed, scale, 128, out)
    q, _ = int4.quantize_int4(w, torch.bfloat16, 128)
    assert torch.equal(out, (q.float().view(48, 2, 128) * scale.float()[..., None]).view(48, 256))
