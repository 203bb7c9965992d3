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


@pytest.mark.parametrize(
    "flags, isa",
    [(("avx2", "fma", "f16c", "avx512f", "avx512bw"), "avx512"), (("avx2", "fma", "f16c"), "avx2"),
     (("avx2", "fma"), None), (("avx512f",), None)],
)  # fmt: skip
def test_the_build_follows_the_cpu(monkeypatch, flags, isa):
    """AVX-512F/BW builds everything; AVX2 + FMA + F16C the same kernels without native_vnni*.cpp and
    native_amx_gemm.cpp; else none."""
    from lowmem_paligemma.machine import CPU

    monkeypatch.setattr(native, "cpu", lambda: CPU(model="x", flags=flags, cores=2))
    monkeypatch.delenv(native.ENV_DISABLE, raising=False)
    build = native.chosen()
    assert (build.isa if build else None) == isa
    if build is not None and build.isa == "avx2":
        assert not any("vnni" in f or "amx" in f for f in build.sources)
        assert {"native_dot.cpp", "native_dot_gemm.cpp"} <= set(build.sources)
        assert "-mavx2" in build.cflags and not any("avx512" in f for f in build.cflags)
    monkeypatch.setenv(native.ENV_DISABLE, "1")
    assert native.chosen() is None


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


def _int4_layer(
    o: int, i: int, dtype: torch.dtype, seed: int, group: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lowmem_paligemma.formats import int4

    w = torch.randn(o, i, generator=torch.Generator().manual_seed(seed))
    packed, scale = int4.quantize_int4_packed(w, dtype, group)
    dense = torch.empty(o, i)
    int4.dequantize_int4(packed, scale, group, dense)
    return packed, scale, dense


def _blocks_quantized(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The activations as native_dot.cpp rounds them: blocks of 32 inputs (native_vnni_gemm.cpp: 128), scale
    max|x| / 127, round half to even."""
    from lowmem_paligemma.formats.int4 import VNNI_BLOCK

    xb = x.float().reshape(*x.shape[:-1], -1, block or VNNI_BLOCK)
    s = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(s > 0, torch.round(xb / s.clamp_min(torch.finfo(torch.float32).tiny)), 0).clamp(-127, 127)
    return (q * s).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 16])
# one block; O not a multiple of R or kGrain; 35 blocks (AVX-512: a half run last)
@pytest.mark.parametrize("o, i", [(16, 32), (50, 96), (48, 2048), (40, 1120)])
def test_int8_dot_is_the_blockwise_int8_product(dtype, rows, o, i):
    """native_dot.cpp's int8 decode (AVX2's or AVX512-VNNI's) equals F.linear of the block-quantized activations and
    the dequantized weights up to the order of fp32 sums: |w| x sign-moved x_q loses nothing, -127 and 0 weights
    included, and a row of an odd number of 32-input blocks (a half run on AVX-512)."""
    from lowmem_paligemma.formats.int8 import quantize_int8

    nk = native.kernels()
    if nk is None or not nk.int8_dot():
        pytest.skip("no integer int8 decode on this machine")
    gen = torch.Generator().manual_seed(o + i + rows)
    w = torch.randn(o, i, generator=gen)
    w[0, :7] = 0
    q, scale = quantize_int8(w, dtype)
    q[1, ::3] = -127  # the extremes: pair sums up to 2 * 127 * 127
    x = torch.randn(rows, i, generator=gen) * torch.rand(i, generator=gen) * 4
    if i > 32:
        x[:, :32] = 0  # an all-zero block (scale 0)
    x[0, -1] = -300.0  # an outlier: only its block's scale may grow
    got = nk.gemv_int8_dot(x.to(dtype), q, scale)
    assert got.shape == (rows, o) and got.dtype == dtype
    want = torch.nn.functional.linear(_blocks_quantized(x.to(dtype)), q.float() * scale.float()[:, None])
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]  # the output's own rounding
    assert (got.float() - want).abs().max() <= tol * want.abs().max()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        nk.gemv_int8_dot(torch.zeros(1, 48), torch.zeros(16, 48, dtype=torch.int8), torch.ones(16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])  # each row count's register blocking (R x M), 16 the most
# output rows not a multiple of R or kGrain; groups of one chunk (128) and of two (256: a scale read per two chunks)
@pytest.mark.parametrize("o, i, group", [(16, 128, 128), (52 * 16, 384, 128), (48, 2048, 128), (40, 1024, 256)])
def test_int4_dot_is_the_blockwise_int8_product(dtype, rows, o, i, group):
    """native_dot.cpp's product (vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2) equals F.linear of the block-quantized
    activations and the dequantized weights up to the order of fp32 sums, whatever the stored scale dtype: its
    integer sums lose nothing (large activations included: vpmaddubsw's 16-bit pair sums must not saturate)."""
    nk = native.kernels()
    if nk is None or not nk.int8_dot():
        pytest.skip("no integer dot product kernel on this machine")
    packed, scale, dense = _int4_layer(o, i, dtype, seed=o + i, group=group)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, i, generator=gen) * torch.rand(i, generator=gen) * 4
    x[:, 32:64] = 0  # an all-zero block (scale 0)
    x[0, 5] = 300.0  # an outlier: only its block's scale may grow
    got = nk.gemv_int4_dot(x.to(dtype), packed, scale, group)
    assert got.shape == (rows, o) and got.dtype == dtype
    want = torch.nn.functional.linear(_blocks_quantized(x.to(dtype)), dense)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # the output's own rounding
    assert (got.float() - want).abs().max() <= tol * want.abs().max()


def test_int4_dot_refuses_groups_it_cannot_step_through():
    nk = native.kernels()
    if nk is None or not nk.int8_dot():
        pytest.skip("no integer dot product kernel on this machine")
    packed = torch.zeros(16, 64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        nk.gemv_int4_dot(torch.zeros(1, 128), packed, torch.ones(16, 2), 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# rows: fewer than one register block (6), not a multiple of it, most of a 528-row pass; outputs: one register of
# 16, a 64-row task plus a 16-row tail, 5 tasks and a 48-row tail; groups of 128 and 256
@pytest.mark.parametrize(
    "rows, o, i, group", [(17, 16, 128, 128), (23, 80, 384, 128), (247, 368, 512, 256), (5, 48, 256, 128)]
)
def test_int4_vnni_prefill_is_the_blockwise_int8_product(dtype, rows, o, i, group):
    """native_vnni_gemm.cpp's product equals F.linear of the activations quantized in blocks of 128 and the
    dequantized weights up to the order of fp32 sums: its panels, transposes and int32 sums lose nothing."""
    from lowmem_paligemma.formats import int4

    nk = native.kernels()
    if nk is None or not nk.has_vnni():
        pytest.skip("no AVX512-VNNI kernel on this machine")
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(o))
    packed, scale = int4.quantize_int4_packed(w, dtype, group)
    dense = torch.empty(o, i)
    int4.dequantize_int4(packed, scale, group, dense)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, i, generator=gen) * torch.rand(i, generator=gen) * 4
    x[:-1, :128] = 0  # an all-zero block (scale 0); the last row keeps it
    x[-1, 3] = 300.0  # an outlier: only its block's scale may grow
    got = nk.gemm_int4_vnni(x.to(dtype), packed, scale, group)
    assert got.shape == (rows, o) and got.dtype == dtype
    want = torch.nn.functional.linear(_blocks_quantized(x.to(dtype), int4.VNNI_PREFILL_BLOCK), dense)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # the output's own rounding
    assert (got.float() - want).abs().max() <= tol * want.abs().max()
    if i > 128:  # one scale a row would spread the outlier's: the test tells the block size
        coarse = torch.nn.functional.linear(_blocks_quantized(x.to(dtype), i), dense)
        assert (coarse - want).abs().max() > 3 * tol * want.abs().max()


def test_int4_vnni_prefill_refuses_shapes_it_cannot_tile():
    nk = native.kernels()
    if nk is None or not nk.has_vnni():
        pytest.skip("no AVX512-VNNI kernel on this machine")
    with pytest.raises(RuntimeError, match="multiple of 128"):
        nk.gemm_int4_vnni(torch.zeros(20, 128), torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2), 64)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        nk.gemm_int4_vnni(torch.zeros(20, 128), torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 1), 128)
    with pytest.raises(RuntimeError, match="activation"):
        nk.gemm_int4_vnni(torch.zeros(20, 128, dtype=torch.int32), torch.zeros(16, 64, dtype=torch.uint8),
                          torch.ones(16, 1), 128)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# rows across register blocks and past a pass (528); inputs a multiple of 128, one with a short last chunk (4304:
# SigLIP's), one under a chunk; outputs with a 16-row tail
@pytest.mark.parametrize("m, o, i", [(17, 48, 128), (530, 80, 200), (23, 16, 4304), (5, 208, 384), (20, 32, 37)])
def test_int8_vnni_prefill_gives_int_mms_bits(dtype, m, o, i):
    """native_vnni_gemm.cpp's int8 product is `int_mm`'s: the rows quantized as quantize_rows_int8 does (inputs not
    a multiple of 16: the masked tail), the same int32 sums (the weights signed, the activations made unsigned and
    the 128s taken off), then rescale_int32's two fp32 products."""
    from lowmem_paligemma.formats.int8 import quantize_int8

    nk = native.kernels()
    if nk is None or not nk.has_vnni():
        pytest.skip("no AVX512-VNNI kernel on this machine")
    gen = torch.Generator().manual_seed(m + i)
    x = (torch.randn(m, i, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    x[1] = 0  # a zero row
    q, scale = quantize_int8(torch.randn(o, i, generator=gen), dtype)
    q[0] = -127  # extreme weights: -128 * their sum is the largest correction
    with torch.inference_mode():
        got = nk.gemm_int8_vnni(x, q, scale)
        xq, xs = nk.quantize_rows_int8(x)
        want = nk.rescale_int32((xq.int() @ q.int().t()).contiguous(), xs, scale, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# rows: under one tile of 16, not a multiple of 16, past one pass (528); outputs: one tile, a 64-row task plus a
# 16-row tail, 32 rows (a task with two tiles); groups of 128 and 256
@pytest.mark.parametrize(
    "rows, o, i, group", [(5, 16, 128, 128), (23, 80, 384, 128), (545, 368, 512, 256), (40, 32, 256, 128)]
)
def test_int4_amx_prefill_gives_the_vnni_bits(dtype, rows, o, i, group):
    """native_amx_gemm.cpp's int4 product is native_vnni_gemm.cpp's, bit for bit: the same int32 sums of each
    block (signed activations times the stored nibbles, vpdpbusd's start added), then the same fp32 steps."""
    from lowmem_paligemma.formats import int4

    nk = native.kernels()
    if nk is None or not nk.has_amx():
        pytest.skip("no AMX kernel on this machine")
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(o))
    w[1] = 0  # a zero group scale
    packed, scale = int4.quantize_int4_packed(w, dtype, group)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, i, generator=gen) * torch.rand(i, generator=gen) * 4
    x[:-1, :128] = 0  # an all-zero block
    x[-1, 3] = 300.0
    got = nk.gemm_int4_amx(x.to(dtype), packed, scale, group)
    assert got.shape == (rows, o) and got.dtype == dtype
    assert torch.equal(got, nk.gemm_int4_vnni(x.to(dtype), packed, scale, group))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# as the vnni test: rows across tiles and past a pass (528), a short last chunk (4304: SigLIP's), under a chunk
@pytest.mark.parametrize("m, o, i", [(17, 48, 128), (530, 80, 200), (23, 16, 4304), (5, 208, 384), (20, 32, 37)])
def test_int8_amx_prefill_gives_int_mms_bits(dtype, m, o, i):
    """native_amx_gemm.cpp's int8 product is `int_mm`'s: the rows quantized as quantize_rows_int8 does, the same
    int32 sums (signed times signed: nothing to take off), rescale_int32's two fp32 products."""
    from lowmem_paligemma.formats.int8 import quantize_int8

    nk = native.kernels()
    if nk is None or not nk.has_amx():
        pytest.skip("no AMX kernel on this machine")
    gen = torch.Generator().manual_seed(m + i)
    x = (torch.randn(m, i, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    x[1] = 0
    q, scale = quantize_int8(torch.randn(o, i, generator=gen), dtype)
    q[0] = -127
    x[2] = x[2].abs().max() * -1.0  # a row at -127 everywhere: the largest sums
    with torch.inference_mode():
        got = nk.gemm_int8_amx(x, q, scale)
        xq, xs = nk.quantize_rows_int8(x)
        want = nk.rescale_int32((xq.int() @ q.int().t()).contiguous(), xs, scale, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_amx_prefills_refuse_shapes_they_cannot_tile():
    nk = native.kernels()
    if nk is None or not nk.has_amx():
        pytest.skip("no AMX kernel on this machine")
    with pytest.raises(RuntimeError, match="multiple of 16"):
        nk.gemm_int4_amx(torch.zeros(20, 128), torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 1), 128)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        nk.gemm_int8_amx(torch.zeros(20, 128), torch.zeros(8, 128, dtype=torch.int8), torch.ones(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# rows: fewer than a register block (6), not a multiple of it, past one pass (528); outputs: one block of 16, a
# 64-row task plus a 16-row tail; groups of 128 and 256
@pytest.mark.parametrize(
    "rows, o, i, group", [(17, 16, 128, 128), (23, 80, 384, 128), (530, 368, 512, 256), (5, 48, 256, 128)]
)
def test_int4_avx2_prefill_is_the_blockwise_int8_product(dtype, rows, o, i, group):
    """native_dot_gemm.cpp's int4 product (AVX2, both builds compile it) equals F.linear of the activations quantized
    in blocks of 128 and the dequantized weights up to the order of fp32 sums (extreme nibbles and activations: its
    16-bit pair sums must not overflow), and where the CPU has VNNI, gemm_int4_vnni's bits."""
    from lowmem_paligemma.formats import int4

    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    packed, scale, dense = _int4_layer(o, i, dtype, seed=o, group=group)
    packed[0] = 0xFF  # every nibble 15 (q = 7): the largest unsigned operand
    packed[1] = 0x00  # q = -8
    dense[:2] = 0
    int4.dequantize_int4(packed[:2], scale[:2], group, dense[:2])
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, i, generator=gen) * torch.rand(i, generator=gen) * 4
    x[:-1, :128] = 0  # an all-zero block (scale 0); the last row keeps it
    x[-1, 3] = 300.0  # an outlier: only its block's scale may grow
    x[2 % rows, 128:] = torch.where(torch.arange(i - 128) % 2 == 0, 5.0, -5.0)  # +-127 after quantizing
    with torch.inference_mode():
        got = nk.gemm_int4_dot(x.to(dtype), packed, scale, group)
    assert got.shape == (rows, o) and got.dtype == dtype
    want = torch.nn.functional.linear(_blocks_quantized(x.to(dtype), int4.VNNI_PREFILL_BLOCK), dense)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # the output's own rounding
    assert (got.float() - want).abs().max() <= tol * want.abs().max()
    if nk.has_vnni():
        assert torch.equal(got, nk.gemm_int4_vnni(x.to(dtype), packed, scale, group))
    with pytest.raises(RuntimeError, match="multiple of 128"):
        nk.gemm_int4_dot(torch.zeros(20, 128), torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2), 64)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        nk.gemm_int4_dot(torch.zeros(20, 128), torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 1), 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# rows across register blocks and past a pass (528); inputs a multiple of 64, a short last chunk (4304: SigLIP's, 200),
# one under a chunk; outputs with a 16-row tail
@pytest.mark.parametrize("m, o, i", [(17, 48, 128), (530, 80, 200), (23, 16, 4304), (5, 208, 384), (20, 32, 37)])
def test_int8_avx2_prefill_gives_int_mms_bits(dtype, m, o, i):
    """native_dot_gemm.cpp's int8 product is `int_mm`'s: int8.py's quantize_rows_int8 rows, exact int32 sums (the
    extremes: -127 weights against +-127 activations), then the two fp32 products of int8.py's torch path."""
    from lowmem_paligemma.formats.int8 import quantize_int8, quantize_rows_int8

    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    gen = torch.Generator().manual_seed(m + i)
    x = (torch.randn(m, i, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    x[1] = 0  # a zero row: the scale's floor
    x[2 % m] = 3.0  # every activation 127
    q, scale = quantize_int8(torch.randn(o, i, generator=gen), dtype)
    q[0] = -127
    with torch.inference_mode():
        got = nk.gemm_int8_dot(x, q, scale)
    xq, xs = quantize_rows_int8(x)
    want = (xq.int() @ q.int().t()).float().mul_(xs).mul_(scale.float()).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        nk.gemm_int8_dot(torch.zeros(20, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_16_bits_is_torchs(dtype):
    """native.h's round_row (16 values at a time, then a scalar tail): round half to even, infinities, NaN, the
    largest values and subnormals give torch's bits (through rescale_int32, whose scales pick the values; an AVX2
    build has no rescale_int32: there the rotary's bits below check its round_row)."""
    nk = native.kernels()
    if nk is None or not nk.has_vnni():
        pytest.skip("no AVX512-VNNI kernel on this machine")
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    special = torch.tensor([257.0, 259.0, 65520.0, 65504.0, 3.4e38, float("inf"), -float("inf"), float("nan"), 1e-40,
                            -0.0, 2049.0, 2051.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8])  # fmt: skip
    values = torch.cat([bits.view(torch.float32), special, special])  # 4124: the specials in both loops
    ones = torch.ones(len(values), dtype=torch.int32).view(1, -1)
    got = nk.rescale_int32(ones, torch.ones(1, 1), values, dtype)
    want = values.view(1, -1).to(dtype)
    assert torch.equal(got.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])
    assert torch.equal(got.isnan(), want.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, i, o", [(17, 64, 48), (40, 37, 21), (3, 4304, 130)])  # tails of I % 16 and O % 16
def test_int_mm_passes_give_the_torch_bits(dtype, m, i, o):
    """int8's `int_mm` prefill: native.cpp's activation quantization and int32 rescale are the torch expressions'
    bits (formats/int8.py `quantize_rows_int8`, and `.float().mul_(x_scale).mul_(scale).to(dtype)`)."""
    from lowmem_paligemma.formats.int8 import quantize_int8, quantize_rows_int8

    nk = native.kernels()
    if nk is None or not nk.has_vnni():
        pytest.skip("no AVX512-VNNI kernel on this machine (the `int_mm` prefill is offered with VNNI only)")
    gen = torch.Generator().manual_seed(m + i)
    x = (torch.randn(m, i, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    x[1] = 0  # a zero row: the scale's floor
    with torch.inference_mode():  # as a model runs them (no torch op inside their threads)
        xq, xs = nk.quantize_rows_int8(x)
    want_q, want_s = quantize_rows_int8(x)
    assert torch.equal(xq, want_q) and torch.equal(xs, want_s)
    q, scale = quantize_int8(torch.randn(o, i, generator=gen), dtype)
    y = torch._int_mm(xq, q.t()) if i % 8 == 0 else xq.int() @ q.int().t()
    with torch.inference_mode():
        got = nk.rescale_int32(y.contiguous(), xs, scale, dtype)
    assert got.dtype == dtype and torch.equal(got, y.float().mul_(xs).mul_(scale.float()).to(dtype))


_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _units_apart(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the last place of `want`'s dtype at `want`."""
    mag = want.double().abs().clamp_min(torch.finfo(want.dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - _MANTISSA[want.dtype])
    return (got.double() - want.double()).abs() / ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, d", [(1, 2048), (3, 37), (2, 2304)])  # tails of D % 16
def test_decode_rms_norm_is_gemmas(dtype, rows, d):
    """native_decode.cpp's RMSNorm against gemma.RMSNorm's torch ops: only the sum of squares is summed in another
    order, so at most one unit apart, and rarely."""
    from lowmem_paligemma.model.gemma import RMSNorm

    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    gen = torch.Generator().manual_seed(rows * d)
    norm = RMSNorm(d, 1e-6)
    norm.weight.data = torch.randn(d, generator=gen) * 0.5
    norm = norm.to(dtype)
    x = (torch.randn(rows, 1, d, generator=gen) * 4).to(dtype)
    h = x.float()  # the torch expression, written out: RMSNorm.forward takes the native path for this shape
    want = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + norm.weight.float())).to(dtype)
    got = nk.rms_norm(x, norm.weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    apart = _units_apart(got, want)
    assert apart.max() <= 1 and (apart > 0).float().mean() <= 0.01
    assert torch.equal(norm(x), got)  # the module's decode path is this kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, h", [(8, 256), (3, 40), (2, 8)])  # half a head: 128, 20 (a masked tail), 4
def test_decode_rope_gives_torchs_bits(dtype, heads, h):
    """native_decode.cpp's rotary on a projection's view (B, N, 1, H) (heads H apart, batch rows N * H apart),
    two sequences at different positions: the bits of gemma.apply_rope's three torch ops, in every dtype."""
    from lowmem_paligemma.model import gemma

    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    gen = torch.Generator().manual_seed(heads * h)
    x = (torch.randn(2, 1, heads, h, generator=gen) * 3).to(dtype).transpose(1, 2)  # (B, N, 1, H), not contiguous
    cos, sin = gemma.rope_tables(torch.tensor([[5], [1000]]), h, 10000.0, dtype)
    half = h // 2
    want = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    got = nk.rope(x, cos, sin)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(gemma.apply_rope(x, cos, sin), want)
    with pytest.raises(RuntimeError, match=r"\(B, N, 1, H\)"):
        nk.rope(torch.cat([x, x], 2), cos, sin)  # two positions: a prefill's, not this kernel's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [16384, 9216 + 5, 7])  # whole tasks of 4096, a tail task, one masked vector
def test_decode_gelu_times_up_is_the_function_rounded(dtype, n):
    """gelu_tanh(gate) * up in place: the tanh-form gelu to fp32's precision (against float64, written without the
    cancellation of torch's 1 + tanh form), rounded to the dtype, then times up rounded to the dtype."""
    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    gen = torch.Generator().manual_seed(n)
    gate = (torch.randn(1, 1, n, generator=gen) * 3).to(dtype)
    gate[0, 0, :4] = torch.tensor([0.0, -30.0, 30.0, float("nan")])  # zero, the two saturated ends, a NaN
    up = torch.randn(1, 1, n, generator=gen).to(dtype)
    x = gate.double()  # 0.5 x (1 + tanh(u)) = x sigmoid(2u): float64's 1 + tanh(u) still cancels for x < -7
    gelu64 = x * torch.sigmoid(2 * 0.7978845608028654 * (x + 0.044715 * x**3))
    want = (gelu64.to(dtype).double() * up.double()).to(dtype)  # each step correctly rounded
    out = gate.clone()
    got = nk.gelu_tanh_mul_(out, up)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype  # in place
    assert got[0, 0, 3].isnan() and got[0, 0, 1] == 0 and got[0, 0, 2] == want[0, 0, 2]
    finite = ~want.isnan()
    apart = _units_apart(got[finite], want[finite])
    big = want[finite].double().abs() > 1e-30  # tiny products: compared absolutely
    if dtype == torch.float32:  # fp32 arithmetic: a few units, and e^(-2u)'s condition |2u| where the tail is steep
        steep = (2 * 0.7978845608028654 * (x + 0.044715 * x**3)).abs()[finite][big]
        assert (apart[big] / (4 + steep)).max() <= 3  # u comes out of four fp32 roundings
    else:  # the fp32 gelu lands within a unit of the rounding of the exact one; rarely across it
        assert apart[big].max() <= 1 and (apart[big] > 0).float().mean() <= 0.03
    assert ((got[finite] - want[finite]).double().abs()[~big] <= 1e-30).all()
    with pytest.raises(RuntimeError, match="one shape"):
        nk.gelu_tanh_mul_(gate.clone(), up[..., :-1].contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("o, i", [(40, 64), (17, 37)])  # I % 16: the masked tail and plain stores
def test_int8_dequantized_to_float32_is_torchs(dtype, o, i):
    """native.cpp's dequantize_int8_float32 (int8's "upcast" prefill): q * scale exactly, as torch's two passes."""
    from lowmem_paligemma.formats.int8 import quantize_int8

    nk = native.kernels()
    if nk is None:
        pytest.skip("the native kernels are not available on this machine")
    q, scale = quantize_int8(torch.randn(o, i, generator=torch.Generator().manual_seed(o)), dtype)
    out = torch.full((o, i), float("nan"))
    nk.dequantize_int8_float32(q, scale, out)
    assert torch.equal(out, q.float() * scale.float().view(-1, 1))
    offset = torch.empty(o * i + 1)[1:].view(o, i)  # not 64-byte aligned: no streamed stores
    nk.dequantize_int8_float32(q, scale, offset)
    assert torch.equal(offset, out)
    with pytest.raises(RuntimeError, match="float32"):
        nk.dequantize_int8_float32(q, scale, torch.empty(o, i, dtype=torch.bfloat16))
