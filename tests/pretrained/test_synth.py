"""synth: tokenizer id layout, checkpoint file format, determinism, and transformers loading what we write."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowmem_paligemma.checkpoint.safetensors_io import DEFAULT_MAX_SHARD_BYTES, shard_plan
from lowmem_paligemma.model.config import PRESETS, TINY_BASE_VOCAB, TINY_IMAGE_TOKEN, load_config, tiny
from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration
from lowmem_paligemma.pretrained import synth

EMBED = "language_model.model.embed_tokens.weight"


def read_checkpoint(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = sf.get_tensor(k)
    return out


def model_shapes(cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


# --- tokenizer ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def full_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok_full")
    synth.write_tokenizer(d)  # the real 256000-piece layout
    return d


def load_tok(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d, local_files_only=True)


@pytest.mark.parametrize("layout", ["full", "tiny"])
def test_tokenizer_ids(layout: str, full_tokenizer_dir: Path, tiny_pg1_dir: Path) -> None:
    d, base = (full_tokenizer_dir, 256000) if layout == "full" else (tiny_pg1_dir, TINY_BASE_VOCAB)
    tok = load_tok(d)
    fixed = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<start_of_turn>": 106,
             "<end_of_turn>": 107, "\n": 108}  # fmt: skip
    added = {"<loc0000>": base, "<loc1023>": base + 1023, "<seg000>": base + 1024, "<seg127>": base + 1151,
             "<image>": base + 1152}  # fmt: skip
    for piece, i in (fixed | added).items():
        assert tok.convert_tokens_to_ids(piece) == i, piece
    assert len(tok) == base + 1153
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert json.loads((d / "added_tokens.json").read_text()) == {"<image>": base + 1152}
    if layout == "tiny":
        assert base + 1152 == TINY_IMAGE_TOKEN
    else:
        assert base + 1152 == PRESETS["paligemma-3b-224"].image_token_index == 257152


def test_tokenizer_text_and_decode(full_tokenizer_dir: Path) -> None:
    tok = load_tok(full_tokenizer_dir)
    text = "caption en\n<start_of_turn>what color is the cat? héllo 日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    head = tok("caption en", add_special_tokens=False)["input_ids"]
    assert ids[: len(head) + 2] == head + [108, 106]  # "\n" and <start_of_turn> are single pieces
    assert tok.decode(ids) == text  # byte fallback round-trips any text
    # loc/seg are plain added tokens: they survive skip_special_tokens; <image>/<bos>/<eos> do not.
    loc = [256000 + 12, 256000 + 1023, 257024 + 5]
    assert tok.decode([257152, 2, *loc, 1], skip_special_tokens=True) == "<loc0012><loc1023><seg005>"
    assert tok.convert_ids_to_tokens(257152) == "<image>"


def test_tokenizer_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        synth.write_tokenizer("/nonexistent", base_vocab=200)


# --- checkpoint files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gemma2", [False, True])
def test_checkpoint_files(gemma2: bool, tiny_pg1_dir: Path, tiny_pg2_dir: Path) -> None:
    d = tiny_pg2_dir if gemma2 else tiny_pg1_dir
    cfg = tiny(gemma2)
    assert load_config(d) == cfg
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "float32"
    eos = [1, 107] if gemma2 else 1
    assert json.loads((d / "generation_config.json").read_text()) == {"bos_token_id": 2, "eos_token_id": eos,
                                                                      "pad_token_id": 0}  # fmt: skip
    pre = json.loads((d / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 28, "width": 28} and pre["image_seq_length"] == 16 and pre["resample"] == 3

    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = read_checkpoint(d)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())
    for name in shards:
        with safe_open(d / name, framework="pt") as sf:
            keys = list(sf.keys())
            assert sf.metadata() == {"format": "pt"}
        assert all(index["weight_map"][k] == name for k in keys)
        data = sum(tensors[k].nbytes for k in keys)
        raw = (d / name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert (8 + n) % 8 == 0 and len(raw) == 8 + n + data  # aligned header, no gaps, no trailing bytes
        assert data <= 100_000 or len(keys) == 1  # over the limit only as a tensor alone in its shard
    assert {k: tuple(t.shape) for k, t in tensors.items()} == model_shapes(cfg)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_initialisation(tiny_pg2_dir: Path) -> None:
    cfg = tiny(gemma2=True)
    t = read_checkpoint(tiny_pg2_dir)
    e = t[EMBED]
    zero_rows = [0, 1, 2, 3, 107, 108, cfg.image_token_index]
    assert e[zero_rows].abs().max() == 0 and e[cfg.image_token_index :].abs().max() == 0
    assert (e[4:100].abs().sum(-1) > 0).all()
    # RMS of E * sqrt(D) is small (the residual stream starts there), matrices ~1.5 / sqrt(fan_in).
    assert 0.01 < (e[4:1600] * math.sqrt(64)).pow(2).mean().sqrt() < 0.1
    q = t["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std() - 1.5 / math.sqrt(64)) < 0.02
    ln = t["vision_tower.vision_model.encoder.layers.0.layer_norm1.weight"]  # LayerNorm: 1 + N(0, 0.1)
    assert abs(ln.mean() - 1) < 0.1 and 0.02 < ln.std() < 0.3
    rms = t["language_model.model.layers.0.input_layernorm.weight"]  # RMSNorm weight is an offset: 1 + w
    assert abs(rms.mean()) < 0.1 and 0.02 < rms.std() < 0.3


def test_deterministic_and_dtype_independent(tmp_path: Path) -> None:
    a = synth.tiny_checkpoint(tmp_path / "a", tokenizer=False)
    b = synth.tiny_checkpoint(tmp_path / "b", tokenizer=False)
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    ta = read_checkpoint(a)
    # bf16 in one big file (no index, like transformers with a single shard) holds the rounded fp32 values.
    c = synth.tiny_checkpoint(tmp_path / "c", dtype=torch.bfloat16, max_shard_bytes=10**9, tokenizer=False)
    assert [p.name for p in c.glob("*.safetensors")] == ["model.safetensors"]
    assert not (c / "model.safetensors.index.json").exists()
    assert json.loads((c / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tc = read_checkpoint(c)
    assert all(tc[k].dtype == torch.bfloat16 and torch.equal(tc[k], v.to(torch.bfloat16)) for k, v in ta.items())
    td = read_checkpoint(synth.tiny_checkpoint(tmp_path / "d", seed=1, tokenizer=False))
    assert not torch.equal(td[EMBED], ta[EMBED])
    te = read_checkpoint(synth.tiny_checkpoint(tmp_path / "e", scale=2.0, tokenizer=False))
    assert torch.allclose(te[EMBED], 2 * ta[EMBED])


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        synth.tiny_checkpoint(tmp_path / "x", dtype=torch.int8, tokenizer=False)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        synth.tiny_checkpoint(tmp_path / "y", max_shard_bytes=0, tokenizer=False)


def test_full_size_layout_on_meta() -> None:
    # PaliGemma-3B fp32 at the 5 GB default splits into 3 shards, as on the Hub (docs/model.md, "Checkpoint layout");
    # nothing is allocated.
    shapes = synth.param_shapes(PRESETS["paligemma-3b-224"])
    assert len(shapes) == 603 and sum(math.prod(s) for s in shapes.values()) == 2_923_466_480
    plan = shard_plan({k: 4 * math.prod(s) for k, s in shapes.items()}, DEFAULT_MAX_SHARD_BYTES)
    assert len(plan) == 3 and sum(map(len, plan)) == 603


# --- transformers reads what we write -----------------------------------------------------------------------------


def load_hf(d: Path):
    from transformers import PaliGemmaForConditionalGeneration as HFModel

    model, info = HFModel.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    return model


@pytest.mark.parametrize("gemma2", [False, True])
def test_transformers_loads_tiny(gemma2: bool, tiny_pg1_dir: Path, tiny_pg2_dir: Path) -> None:
    d = tiny_pg2_dir if gemma2 else tiny_pg1_dir
    sd = load_hf(d).state_dict()
    ours = read_checkpoint(d)
    # transformers 5.x names: model.vision_tower.* (no vision_model.), model.language_model.*, tied lm_head.
    assert torch.equal(sd["lm_head.weight"], ours[EMBED])
    assert torch.equal(sd["model.language_model.embed_tokens.weight"], ours[EMBED])
    key = "encoder.layers.1.mlp.fc2.weight"
    assert torch.equal(sd[f"model.vision_tower.{key}"], ours[f"vision_tower.vision_model.{key}"])


@pytest.mark.parametrize("variant", synth.KEY_VARIANTS)
@pytest.mark.parametrize("lm_head", [False, True])
def test_key_variants(variant: str, lm_head: bool, tiny_pg1_dir: Path, tmp_path: Path) -> None:
    d = synth.write_key_variant(tiny_pg1_dir, tmp_path / variant, variant, lm_head=lm_head)
    src, out = read_checkpoint(tiny_pg1_dir), read_checkpoint(d)
    prefixes = {
        "hub": ("vision_tower.vision_model.", "multi_modal_projector.linear.", "language_model.model."),
        "tf_4_52": ("model.vision_tower.vision_model.", "model.multi_modal_projector.linear.", "model.language_model."),
        "tf5_memory": ("model.vision_tower.", "model.multi_modal_projector.linear.", "model.language_model."),
        "tf5_save": ("vision_tower.", "multi_modal_projector.linear.", "language_model.model."),
    }[variant]
    head = {"hub": "language_model.lm_head.weight", "tf5_save": "language_model.lm_head.weight"}.get(
        variant, "lm_head.weight"
    )
    assert (head in out) == lm_head and len(out) == len(src) + lm_head
    if lm_head:
        assert torch.equal(out[head], src[EMBED])
    body = [k for k in out if k != head]
    assert all(k.startswith(prefixes) for k in body)
    if variant in ("tf5_memory", "tf5_save"):
        assert not any("vision_model." in k for k in body)
    assert all(torch.equal(out[synth.rename_key(k, variant)], v) for k, v in src.items())
    assert len(list(d.glob("*.safetensors"))) > 1 and (d / "tokenizer.json").is_file()
    # transformers 5.23 maps every writer's names back (docs/model.md, "Key-name variants"): same weights as the
    # Hub-layout file.
    sd = load_hf(d).state_dict()
    assert torch.equal(sd["model.language_model.embed_tokens.weight"], src[EMBED])


def test_key_variant_errors(tiny_pg1_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key variant"):
        synth.write_key_variant(tiny_pg1_dir, tmp_path / "x", "tf3")
    with pytest.raises(ValueError, match="not a Hub PaliGemma key"):
        synth.rename_key("model.vision_tower.embeddings.patch_embedding.weight", "hub")


def test_rewrite_and_progress(tmp_path: Path) -> None:
    d = synth.tiny_checkpoint(tmp_path, tokenizer=False)
    assert len(list(d.glob("*.safetensors"))) > 2
    calls: list[tuple[int, int]] = []
    synth.tiny_checkpoint(
        d, tokenizer=False, max_shard_bytes=10**9, progress=lambda done, total: calls.append((done, total))
    )
    # The old shards and index are gone: a loader globbing the directory sees one checkpoint only.
    assert sorted(p.name for p in d.glob("model*")) == ["model.safetensors"]
    total = sum(t.nbytes for t in read_checkpoint(d).values())
    assert len(calls) == len(synth.param_shapes(tiny())) and calls[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
