"""PaliGemma entry points: every writer's key names, readable key errors, transformers' class, model paths."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_paligemma import (
    CheckpointError,
    InsufficientMemoryError,
    TokenizerError,
    defaults,
    load_hf_model,
    load_model,
    load_transformers_model,
)
from lowmem_paligemma.checkpoint import preflight
from lowmem_paligemma.model.config import load_config
from lowmem_paligemma.pretrained.load import load_memory_bytes
from lowmem_paligemma.pretrained.synth import write_key_variant


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("variant", ["hub", "tf_4_52", "tf5_memory", "tf5_save"])
@pytest.mark.parametrize("lm_head", [False, True])
def test_key_variants_load_identically(tiny_pg2_dir, tmp_path, variant, lm_head):
    want = _params(load_model(tiny_pg2_dir, dtype=torch.float32).model)
    got = _params(
        load_model(
            write_key_variant(tiny_pg2_dir, tmp_path / variant, variant, lm_head=lm_head), dtype=torch.float32
        ).model
    )
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def _rewrite_single_file(src, dst, edit):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {}
    for path in sorted(src.glob("*.safetensors")):
        state |= load_file(path)
    save_file(edit(state), dst / "model.safetensors")
    return dst


def test_missing_key_is_named(tiny_pg2_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    bad = _rewrite_single_file(tiny_pg2_dir, tmp_path / "m", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CheckpointError, match=r"missing key\(s\): language_model\.model\.layers\.1\.mlp\.up_proj"):
        load_model(bad)


def test_unexpected_key_is_named(tiny_pg2_dir, tmp_path):
    bad = _rewrite_single_file(
        tiny_pg2_dir, tmp_path / "u", lambda s: s | {"language_model.model.extra.weight": torch.ones(2)}
    )
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): language_model\.model\.extra\.weight"):
        load_model(bad)


def test_shape_mismatch_is_named(tiny_pg2_dir, tmp_path):
    key = "multi_modal_projector.linear.bias"
    bad = _rewrite_single_file(tiny_pg2_dir, tmp_path / "s", lambda s: s | {key: torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.linear\.bias.*shape \[3\].*expects \[64\]"):
        load_model(bad)


def test_a_stored_head_of_the_wrong_shape_is_refused(tiny_pg2_dir, tmp_path):
    bad = _rewrite_single_file(tiny_pg2_dir, tmp_path / "h", lambda s: s | {"lm_head.weight": torch.ones(3, 64)})
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' shape \[3, 64\] is not .*embed_tokens"):
        load_model(bad)


def test_model_paths_are_explained(tmp_path, tiny_pg1_dir):
    with pytest.raises(CheckpointError, match="no such directory$"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="Hub model id.*hf download google/paligemma-3b-pt-224"):
        load_hf_model("google/paligemma-3b-pt-224")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "file")
    model, tokenizer = load_hf_model(tiny_pg1_dir)
    assert model.dtype == torch.float16 and tokenizer.convert_tokens_to_ids("<image>") == model.cfg.image_token_index


def test_transformers_class_through_our_stream(tiny_pg2_dir):
    from transformers import PaliGemmaForConditionalGeneration as HFModel

    ref = HFModel.from_pretrained(tiny_pg2_dir, attn_implementation="eager", dtype=torch.float32).eval()
    ours = load_transformers_model(tiny_pg2_dir, dtype=torch.float32, attn_implementation="eager")
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight  # tied again after to_empty
    want_buffers = dict(ref.named_buffers())
    for name, buf in ours.named_buffers():  # position_ids, rope inv_freq, embed_scale rebuilt
        assert torch.equal(buf, want_buffers[name]), name
    cfg = load_config(tiny_pg2_dir)
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108]])
    pv = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv, token_type_ids=torch.zeros_like(ids)).logits
        got = ours(input_ids=ids, pixel_values=pv, token_type_ids=torch.zeros_like(ids)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_memory_bytes_is_what_the_preflight_asks(tiny_pg2_dir, monkeypatch, dtype):
    need = load_memory_bytes(tiny_pg2_dir, dtype)
    weights = sum(p.nbytes for p in load_model(tiny_pg2_dir, dtype=dtype).model.parameters())
    assert need == weights + defaults.CHUNK_BYTES + preflight.RUNTIME_MARGIN_BYTES
    monkeypatch.setattr(preflight, "available_bytes", lambda device: need - 1)
    with pytest.raises(InsufficientMemoryError):
        load_model(tiny_pg2_dir, dtype=dtype)
    monkeypatch.setattr(preflight, "available_bytes", lambda device: need)
    fitted = load_model(tiny_pg2_dir, dtype=dtype).model  # exactly enough: it loads, every weight in place
    assert sum(p.nbytes for p in fitted.parameters()) == weights and not any(p.is_meta for p in fitted.parameters())


@pytest.mark.parametrize("field, value", [("image_token_index", 1663), ("bos_token_id", 5)])
def test_load_hf_model_refuses_a_tokenizer_that_disagrees_with_the_config(tiny_pg1_dir, tmp_path, field, value):
    # Both are valid ids, so config.json alone cannot tell; the prompt would be built from the wrong ones.
    d = shutil.copytree(tiny_pg1_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=rf"differs from {field} {value} in config.json"):
        load_hf_model(d)
