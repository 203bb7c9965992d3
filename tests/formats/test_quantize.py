"""Quantization: the arithmetic, the streamed load equal to quantizing a loaded model, and what it costs in logits.

Quality metric (docs/quantization.md): int8 moves the logits of the tiny random models by at most 6x what storing the
weights in bfloat16 does. Random weights are not real weights: real-checkpoint quality cannot be measured here
(no download).
"""

import pytest
import torch

from lowmem_paligemma import load_model
from lowmem_paligemma.checkpoint import preflight
from lowmem_paligemma.formats.int4 import GROUP as INT4_GROUP
from lowmem_paligemma.formats.int4 import Int4Embedding, Int4Linear, quantize_int4
from lowmem_paligemma.formats.int8 import Int8Embedding, Int8Linear, quantize_int8
from lowmem_paligemma.formats.registry import dequantize
from lowmem_paligemma.model.config import tiny
from lowmem_paligemma.model.generate import generate
from lowmem_paligemma.pretrained.synth import write_checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows_scales_exact_in_dtype_and_bounded_error(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 64, generator=g) * torch.logspace(-3, 1, 37)[:, None]
    w[5] = 0  # an all-zero row (the synthetic embedding has them)
    q, scale = quantize_int8(w, dtype)
    assert q.dtype == torch.int8 and scale.dtype == dtype and q.abs().max() <= 127
    assert torch.equal(q[5], torch.zeros(64, dtype=torch.int8)) and scale[5] == 1
    absmax = w.abs().amax(1)
    assert (scale.float() >= absmax / 127).all()  # rounded up: nothing clips
    err = (q.float() * scale.float()[:, None] - w).abs().amax(1)
    assert (err <= scale.float() / 2 + 1e-12).all()


def test_int4_groups():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 2 * INT4_GROUP, generator=g)
    q, scale = quantize_int4(w, torch.bfloat16)
    assert q.min() >= -8 and q.max() <= 7 and scale.shape == (32, 2)
    dense = (q.float().view(32, 2, -1) * scale.float()[..., None]).view(32, -1)
    assert ((dense - w).abs().view(32, 2, -1).amax(2) <= scale.float() * 0.5 + 1e-6).all()


def _dense_model(model_dir, dtype):
    return load_model(model_dir, dtype=dtype).model


@pytest.mark.parametrize("which", ["pg1", "pg2"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_streamed_quantization_equals_quantizing_a_loaded_model(which, mode, tiny_pg1_dir, tiny_pg2_dir):
    model_dir = tiny_pg1_dir if which == "pg1" else tiny_pg2_dir
    dense = _dense_model(model_dir, torch.bfloat16)
    dense_f32 = _dense_model(model_dir, torch.float32)  # the source values, before any rounding
    quantized = load_model(model_dir, dtype=torch.bfloat16, quantize=mode, chunk_bytes=4096).model  # many small chunks
    seen = 0
    for name, module in quantized.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            w = dense_f32.get_submodule(name).weight.float()
            if isinstance(module, Int8Linear):
                q, scale = quantize_int8(w, torch.bfloat16)
                assert torch.equal(module.weight, q) and torch.equal(module.weight_scale, scale[:, None]), name
            else:
                fresh = Int4Linear(module.in_features, module.out_features, module.bias is not None).to(torch.bfloat16)
                fresh._fill(w, 0)
                assert torch.equal(module.weight_packed, fresh.weight_packed), name
                assert torch.equal(module.weight_scale, fresh.weight_scale), name
            seen += 1
    assert seen > 0 and isinstance(quantized.language_model.model.embed_tokens, Int8Embedding)
    # what stays dense is the same as in the dense load
    dense_params = dict(dense.named_parameters())
    for name, p in quantized.named_parameters():
        if p.is_floating_point() and "scale" not in name and name in dense_params:
            assert torch.equal(p, dense_params[name]), name


@pytest.mark.parametrize("which", ["pg1", "pg2"])
def test_int8_logits_move_a_few_times_what_bf16_storage_does(which, tiny_pg1_dir, tiny_pg2_dir):
    """The metric: relative RMS logit error against the float32 model, int8 vs bfloat16-stored weights (both
    computed in float32). Per weight, int8 rounds to 1/254 of its row's range (~0.6% RMS on these weights),
    bfloat16 to 2^-9 of each value (~0.1%), so int8 should cost about 5x bfloat16's error; measured 3.1-4.3x."""
    model_dir = tiny_pg1_dir if which == "pg1" else tiny_pg2_dir
    ref = load_model(model_dir, dtype=torch.float32).model
    q8 = load_model(model_dir, dtype=torch.float32, quantize="int8").model
    b16 = load_model(model_dir, dtype=torch.float32).model
    with torch.no_grad():
        for p in b16.parameters():
            p.copy_(p.bfloat16().float())
    cfg = ref.cfg
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.full((2, cfg.num_image_tokens), cfg.image_token_index), torch.full((2, 1), 2),
                     torch.randint(10, 500, (2, 20), generator=g)], 1)  # fmt: skip
    pixels = torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    with torch.no_grad():
        want, got, rounded = ref(ids, pixels), q8(ids, pixels), b16(ids, pixels)
    rel = lambda x: ((x - want).pow(2).mean().sqrt() / want.std()).item()  # noqa: E731
    assert 0 < rel(rounded) and rel(got) <= 6 * rel(rounded), (rel(got), rel(rounded))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("which", ["pg1", "pg2"])
def test_generation_runs_quantized(mode, which, tiny_pg1_dir, tiny_pg2_dir):
    model_dir = tiny_pg1_dir if which == "pg1" else tiny_pg2_dir
    model = load_model(model_dir, dtype=torch.bfloat16, quantize=mode).model
    cfg = model.cfg
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108]])
    pixels = torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = list(generate(model, ids, pixel_values=pixels, max_new_tokens=8, eos_token_ids=[]))
    assert len(tokens) == 8 and all(0 <= t < cfg.text.vocab_size for t in tokens)


def test_quantized_sizes_and_dequantize(tiny_pg2_dir):
    dense = load_model(tiny_pg2_dir, dtype=torch.bfloat16).model
    q8 = load_model(tiny_pg2_dir, dtype=torch.bfloat16, quantize="int8").model
    size = lambda m: sum(p.nbytes for p in m.parameters())  # noqa: E731
    assert size(q8) < 0.7 * size(dense)
    layer = q8.language_model.model.layers[0].mlp.up_proj
    ref = dense.language_model.model.layers[0].mlp.up_proj.weight.float()
    assert (dequantize(layer) - ref).abs().max() <= layer.weight_scale.float().max()
    with pytest.raises(ValueError, match="quantize must be one of int8, int4"):
        load_model(tiny_pg2_dir, quantize="int3")


@pytest.mark.parametrize("rows, dim", [(80, 256), (1728, 128), (128, 384)])  # 80, 1728: a partial last block
def test_int4_embedding_rows_come_out_of_the_kernel_layout(rows, dim):
    g = torch.Generator().manual_seed(4)
    table = Int4Embedding(rows, dim).to(torch.bfloat16)
    table._fill(torch.randn(rows, dim, generator=g), 0)
    ids = torch.tensor([[0, 63, 64, rows - 1], [5, rows - 2, 17, 70 % rows]])
    got = table.lookup(ids)
    assert got.shape == (2, 4, dim) and got.dtype == torch.bfloat16
    assert torch.equal(got, dequantize(table)[ids].bfloat16())
    x = torch.randn(3, dim, generator=g).bfloat16()
    torch.testing.assert_close(table.logits(x).float(), x.float() @ dequantize(table).t(), rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def int4_wide_dir(tmp_path_factory):
    """A tiny PaliGemma 2 whose decoder is wide enough (128) for int4 groups of 128; the vision tower is not."""
    cfg = tiny(gemma2=True, hidden_size=128, intermediate_size=256, head_dim=32)
    return write_checkpoint(tmp_path_factory.mktemp("int4"), cfg, max_shard_bytes=200_000)


def test_int4_where_the_kernel_can_int8_elsewhere(int4_wide_dir, tiny_pg1_dir):
    model = load_model(int4_wide_dir, dtype=torch.bfloat16, quantize="int4", chunk_bytes=4096).model
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if hasattr(m, "FORMAT")}
    assert kinds["language_model.model.embed_tokens"] == "Int4Embedding"
    assert kinds["language_model.model.layers.0.mlp.up_proj"] == "Int4Linear"
    assert kinds["vision_tower.vision_model.encoder.layers.0.mlp.fc1"] == "Int8Linear"  # 32-wide input
    assert kinds["multi_modal_projector.linear"] == "Linear"
    dense = load_model(int4_wide_dir, dtype=torch.float32).model
    for name in ("language_model.model.embed_tokens", "language_model.model.layers.1.self_attn.k_proj"):
        rows, dim = dense.get_submodule(name).weight.shape
        fresh = Int4Linear(dim, rows, bias=False).to(torch.bfloat16)
        fresh._fill(dense.get_submodule(name).weight, 0)  # quantizing the loaded weight == streamed quantization
        assert torch.equal(model.get_submodule(name).weight_packed, fresh.weight_packed), name
        assert torch.equal(model.get_submodule(name).weight_scale, fresh.weight_scale), name
    cfg = model.cfg
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108]])
    pixels = torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    assert len(list(generate(model, ids, pixel_values=pixels, max_new_tokens=6, eos_token_ids=[]))) == 6
    small = load_model(tiny_pg1_dir, dtype=torch.bfloat16, quantize="int4").model  # 64 wide: int8 but for down_proj
    mlp = small.language_model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, Int8Linear) and isinstance(mlp.down_proj, Int4Linear)


def test_the_preflight_counts_quantized_bytes_and_suggests_quantizing(tiny_pg2_dir, monkeypatch):
    from lowmem_paligemma import InsufficientMemoryError

    seen = []
    real = preflight.check_memory
    monkeypatch.setattr(preflight, "check_memory", lambda need, *rest: seen.append(need) or real(need, *rest))
    dense = load_model(tiny_pg2_dir, dtype=torch.bfloat16).model
    q8 = load_model(tiny_pg2_dir, dtype=torch.bfloat16, quantize="int8").model
    size = lambda m: sum(p.nbytes for p in m.parameters())  # noqa: E731
    assert seen[1] - seen[0] == size(q8) - size(dense)  # the pre-flight saw exactly the quantized sizes
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 1000)
    with pytest.raises(InsufficientMemoryError, match=r"--quantize int8"):
        load_model(tiny_pg2_dir, dtype=torch.bfloat16)
    with pytest.raises(InsufficientMemoryError, match=r"--quantize int4"):
        load_model(tiny_pg2_dir, dtype=torch.bfloat16, quantize="int8")


def test_impossible_combinations_are_one_clear_error(tiny_pg2_dir):
    from lowmem_paligemma import CheckpointError, OptionError

    with pytest.raises(OptionError, match="max_memory .* CPU only"):
        load_model(tiny_pg2_dir, device="cuda", quantize="int4", max_memory=10**9)
    # Zero-copy maps what is stored as loaded and quantizes the rest while loading; a float32 norm cannot be
    # mapped as bfloat16.
    with pytest.raises(CheckpointError, match="zero-copy needs a checkpoint stored in bfloat16 .* holds float32"):
        load_model(tiny_pg2_dir, dtype=torch.bfloat16, quantize="int8", zero_copy=True)
    mapped = load_model(tiny_pg2_dir, dtype=torch.float32, quantize="int8", zero_copy=True).model
    copied = load_model(tiny_pg2_dir, dtype=torch.float32, quantize="int8").model
    assert all(torch.equal(a, b) for a, b in zip(mapped.parameters(), copied.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_native_quantizers_give_the_same_bits(dtype):
    """native.cpp's int8 and int4 loops against the torch arithmetic, on rows with zeros, ties and wide ranges."""
    from lowmem_paligemma.formats import native
    from lowmem_paligemma.formats.int4 import pack_int4, quantize_int4_packed

    if native.kernels() is None:
        pytest.skip("the native kernels are not available on this machine")
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(33, 256, generator=g) * torch.logspace(-4, 2, 33)[:, None]).to(dtype)
    w[3] = 0  # an all-zero row: scale 1
    w[5, :8] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 127, -127, 63.5]).to(dtype)  # ties at the rounding points
    # Exact ties at a scale of 1.75, whose reciprocal is inexact: x * (1 / 1.75) lands an ulp beside k + 0.5 for k in
    # -15, -13, -7, 6, 12, 14, where the native loops must divide instead (native.h, Divisor). int8's row: max 222
    # (bf16) or 222.25 -> scale 1.75; int4's groups of 128: max 13.125 -> 1.75.
    top = 222.0 if dtype == torch.bfloat16 else 222.25
    w[6] = torch.tensor([top] + [(k + 0.5) * 1.75 for k in range(-18, 18)]).repeat(7)[:256].to(dtype)
    w[7] = torch.tensor([(k + 0.5) * 1.75 for k in range(-8, 8)]).repeat(16).to(dtype)
    q, scale = quantize_int8(w, dtype)
    with monkeypatch_native_off():
        q_ref, scale_ref = quantize_int8(w, dtype)
        packed_ref = pack_int4(quantize_int4(w, dtype)[0]).view(torch.uint8)
        scale4_ref = quantize_int4(w, dtype)[1]
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert scale[6].item() == 1.75 and (q_ref[6, 1:37] % 2 == 0).all()  # each tie went to its even neighbour
    # into a loading layer's rows (a slice of its weight; a strided view takes the copy): the same bits, in place
    table = torch.zeros(40, 256, dtype=torch.int8)
    got, _ = quantize_int8(w, dtype, out=table[4:37])
    assert got.data_ptr() == table[4:37].data_ptr() and torch.equal(table[4:37], q_ref)
    assert not table[:4].any() and not table[37:].any()
    wide = torch.zeros(33, 512, dtype=torch.int8)
    quantize_int8(w, dtype, out=wide[:, ::2])
    assert torch.equal(wide[:, ::2], q_ref) and not wide[:, 1::2].any()
    with pytest.raises(RuntimeError, match="out"):
        native.kernels().quantize_int8(w.contiguous(), dtype, torch.zeros(33, 128, dtype=torch.int8))
    packed, scale4 = quantize_int4_packed(w, dtype)
    assert torch.equal(packed, packed_ref) and torch.equal(scale4, scale4_ref)
    rows4 = torch.zeros(40, 128, dtype=torch.uint8)  # int4's bytes into a loading layer's rows, as int8's
    got4, _ = quantize_int4_packed(w, dtype, out=rows4[4:37])
    assert got4.data_ptr() == rows4[4:37].data_ptr() and torch.equal(rows4[4:37], packed_ref)
    assert not rows4[:4].any() and not rows4[37:].any()
    assert (scale4_ref[7] == 1.75).all()


class monkeypatch_native_off:
    """The torch arithmetic for a block: native.kernels() answers None."""

    def __enter__(self):
        from lowmem_paligemma.formats import native

        self.native, self.saved = native, native.kernels
        native.kernels = lambda: None

    def __exit__(self, *exc):
        self.native.kernels = self.saved
