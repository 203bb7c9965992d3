"""Streaming loader: key-name variants, equality with a plain load, tying, buffers, and readable errors."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_paligemma.config import load_config
from lowmem_paligemma.gemma import rope_tables
from lowmem_paligemma.loader import CheckpointError, load_model, normalize_key, read_checkpoint
from lowmem_paligemma.paligemma import PaliGemmaForConditionalGeneration
from lowmem_paligemma.synth import tiny_checkpoint, write_key_variant


@pytest.fixture(scope="module")
def pg2_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("pg2"), gemma2=True)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _plain_state_dict(model_dir):
    state = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state |= {normalize_key(k): v for k, v in load_file(path).items()}
    return state


@pytest.mark.parametrize("variant", ["hub", "tf_4_52", "tf5_memory", "tf5_save"])
@pytest.mark.parametrize("lm_head", [False, True])
def test_key_variants_load_identically(pg2_dir, tmp_path, variant, lm_head):
    want = _params(load_model(pg2_dir, dtype=torch.float32))
    got = _params(
        load_model(write_key_variant(pg2_dir, tmp_path / variant, variant, lm_head=lm_head), dtype=torch.float32)
    )
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_bytes", [512, 64 << 20])
def test_streamed_equals_plain_load_state_dict(pg2_dir, dtype, chunk_bytes):
    streamed = load_model(pg2_dir, dtype=dtype, chunk_bytes=chunk_bytes)
    plain = PaliGemmaForConditionalGeneration(load_config(pg2_dir))
    plain.load_state_dict(_plain_state_dict(pg2_dir), strict=True)
    plain.to(dtype)
    a, b = _params(streamed), _params(plain)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == dtype for k in a)


def test_tied_head_is_the_embedding_and_no_buffers_to_repair(pg2_dir):
    model = load_model(pg2_dir, dtype=torch.float32)
    emb = model.language_model.model.embed_tokens.weight
    vocab_sized = [n for n, p in model.named_parameters() if p.shape == emb.shape]
    assert vocab_sized == ["language_model.model.embed_tokens.weight"]  # one tensor, no lm_head copy
    h = torch.randn(1, 3, emb.shape[1])
    cap = model.cfg.text.final_logit_softcap
    torch.testing.assert_close(model.language_model.logits(h), torch.tanh(h @ emb.T / cap) * cap)
    # Positions and rope tables are computed on the fly, so to_empty leaves nothing stale behind.
    assert list(model.buffers()) == []


def test_rope_tables_equal_transformers_rotary():
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

    hf = Gemma2RotaryEmbedding(Gemma2Config(head_dim=16, rope_theta=10000.0))
    pos = torch.arange(1, 40)[None]
    x = torch.zeros(1, 39, 16)
    want_cos, want_sin = hf(x, pos)
    cos, sin = rope_tables(pos, 16, 10000.0, torch.float32)
    assert torch.equal(cos[:, 0], want_cos) and torch.equal(sin[:, 0], want_sin)


def _rewrite_single_file(src, dst, edit):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {}
    for path in sorted(src.glob("*.safetensors")):
        state |= load_file(path)
    save_file(edit(state), dst / "model.safetensors")
    return dst


def test_missing_key_is_named(pg2_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    bad = _rewrite_single_file(pg2_dir, tmp_path / "m", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CheckpointError, match=r"missing key\(s\): language_model\.model\.layers\.1\.mlp\.up_proj"):
        load_model(bad)


def test_unexpected_key_is_named(pg2_dir, tmp_path):
    bad = _rewrite_single_file(
        pg2_dir, tmp_path / "u", lambda s: s | {"language_model.model.extra.weight": torch.ones(2)}
    )
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): language_model\.model\.extra\.weight"):
        load_model(bad)


def test_shape_mismatch_is_named(pg2_dir, tmp_path):
    key = "multi_modal_projector.linear.bias"
    bad = _rewrite_single_file(pg2_dir, tmp_path / "s", lambda s: s | {key: torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.linear\.bias.*shape \[3\].*expects \[64\]"):
        load_model(bad)


def test_headers_are_read_without_tensor_data(pg2_dir):
    entries = read_checkpoint(pg2_dir)
    assert len(entries) == len(list(load_model(pg2_dir).parameters()))
    assert all(e.nbytes == e.numel * e.dtype.itemsize for e in entries.values())


def test_zero_copy_maps_the_file(tmp_path):
    src = tiny_checkpoint(tmp_path / "bf16", gemma2=True, dtype=torch.bfloat16)
    copied = load_model(src, dtype=torch.bfloat16)
    mapped = load_model(src, dtype=torch.bfloat16, zero_copy=True)
    a, b = _params(copied), _params(mapped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(copied(ids), mapped(ids), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="zero-copy needs a checkpoint stored in float16"):
        load_model(src, dtype=torch.float16, zero_copy=True)


def test_preflight_refuses_what_does_not_fit(pg2_dir, monkeypatch):
    import lowmem_paligemma.loader as loader

    monkeypatch.setattr(loader, "available_bytes", lambda device: 1000)
    with pytest.raises(loader.InsufficientMemoryError, match=r"needs about .* GB .* available.*force"):
        load_model(pg2_dir)
    assert load_model(pg2_dir, force=True) is not None


def test_phases_are_reported_in_order(pg2_dir):
    seen = []
    load_model(pg2_dir, on_phase=seen.append)
    shards = len(list(pg2_dir.glob("*.safetensors")))
    assert seen == ["build", "materialize"] + [f"shard {i}/{shards}" for i in range(1, shards + 1)] + ["done"]


def test_transformers_class_through_our_stream(pg2_dir):
    from transformers import PaliGemmaForConditionalGeneration as HFModel

    from lowmem_paligemma.loader import load_transformers_model

    ref = HFModel.from_pretrained(pg2_dir, attn_implementation="eager", dtype=torch.float32).eval()
    ours = load_transformers_model(pg2_dir, dtype=torch.float32, attn_implementation="eager")
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight  # tied again after to_empty
    want_buffers = dict(ref.named_buffers())
    for name, buf in ours.named_buffers():  # position_ids, rope inv_freq, embed_scale rebuilt
        assert torch.equal(buf, want_buffers[name]), name
    cfg = load_config(pg2_dir)
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108]])
    pv = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv, token_type_ids=torch.zeros_like(ids)).logits
        got = ours(input_ids=ids, pixel_values=pv, token_type_ids=torch.zeros_like(ids)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
