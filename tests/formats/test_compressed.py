"""Pre-quantized checkpoints (compressed-tensors' layout): convert writes them, loading them equals quantizing at
load bit for bit, zero-copy maps what is stored as loaded, bad configs are one line, memory stays bounded, and
transformers (with the compressed-tensors package) loads the same directory to the same logits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from convert_child import convert_growth
from safetensors.torch import load_file, save_file

from lowmem_paligemma import CheckpointError, ConfigError, OptionError, load_model
from lowmem_paligemma.checkpoint.loader import FILL_BYTES_PER_ELEMENT
from lowmem_paligemma.checkpoint.safetensors_io import read_checkpoint
from lowmem_paligemma.formats import registry
from lowmem_paligemma.formats.compressed import MIXED_FORMAT, target
from lowmem_paligemma.formats.int4 import GROUP as INT4_GROUP
from lowmem_paligemma.formats.int4 import Int4Embedding, Int4Linear, pack_int4, unpack_int4
from lowmem_paligemma.formats.int8 import Int8Embedding, Int8Linear
from lowmem_paligemma.formats.registry import dequantize
from lowmem_paligemma.model.config import load_config, tiny
from lowmem_paligemma.pretrained.convert import convert_checkpoint
from lowmem_paligemma.pretrained.keys import transformers_key
from lowmem_paligemma.pretrained.synth import write_checkpoint

MB = 10**6
DTYPE = torch.bfloat16


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory) -> dict[str, Path]:
    """bf16 tiny PaliGemma 1 and 2 with a decoder 128 wide (int4 groups of 128 fit); the vision tower is not."""
    out = {}
    for which, gemma2 in (("pg1", False), ("pg2", True)):
        cfg = tiny(gemma2=gemma2, hidden_size=128, intermediate_size=256, head_dim=32)
        out[which] = write_checkpoint(tmp_path_factory.mktemp(which), cfg, dtype=DTYPE, max_shard_bytes=300_000)
    return out


@pytest.fixture(scope="module")
def converted(wide_dirs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    base = tmp_path_factory.mktemp("converted")
    return {
        (which, mode): convert_checkpoint(src, base / f"{which}-{mode}", dtype=DTYPE, quantize=mode)
        for which, src in wide_dirs.items()
        for mode in ("int8", "int4")
    }


# --- the layout ------------------------------------------------------------------------------------------------


def test_int4_packing_round_trip_and_nibble_order():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 64), generator=g, dtype=torch.int32)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8)
    assert torch.equal(unpack_int4(packed), q)
    # Value j of a row is the nibble q + 8 at bits 4 * (j % 8) of word j // 8.
    row = torch.arange(-8, 0, dtype=torch.int32)[None]  # nibbles 0..7
    assert pack_int4(row).item() == 0x76543210


def test_packing_is_compressed_tensors_own():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (7, 256), generator=g, dtype=torch.int32)
    theirs = helpers.pack_to_int32(q.to(torch.int8), 4)
    assert torch.equal(pack_int4(q), theirs)
    assert torch.equal(helpers.unpack_from_int32(theirs, 4, torch.Size(q.shape)).to(torch.int32), unpack_int4(theirs))


@pytest.mark.parametrize("which", ["pg1", "pg2"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_converted_stores_compressed_tensors_layout(converted, wide_dirs, which, mode):
    dst = converted[which, mode]
    entries = read_checkpoint(dst)
    model = load_model(wide_dirs[which], dtype=DTYPE, quantize=mode).model  # what the loader's policy quantizes
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8Embedding, Int4Embedding)):
            assert entries[name + ".weight"].dtype == DTYPE  # the tied embedding stays dense
        elif isinstance(module, Int4Linear):
            o, i = module.out_features, module.in_features
            assert (entries[name + ".weight_packed"].dtype, entries[name + ".weight_packed"].shape) == (
                torch.int32, (o, i // 8))  # fmt: skip
            assert entries[name + ".weight_scale"].shape == (o, i // INT4_GROUP)
            assert entries[name + ".weight_shape"].dtype == torch.int64 and name + ".weight" not in entries
            layers[name] = "int4"
        elif isinstance(module, Int8Linear):
            assert entries[name + ".weight"].dtype == torch.int8
            assert entries[name + ".weight_scale"].shape == (module.out_features, 1)
            layers[name] = "int8"
    assert entries["multi_modal_projector.linear.weight"].dtype == DTYPE
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    groups = list(qc["config_groups"].values())
    assert qc["format"] == (MIXED_FORMAT if len(groups) == 2 else groups[0]["format"])
    # Each quantized layer matches exactly one group's targets, the one of its precision, under both our names
    # and transformers' (compressed-tensors matches "re:" targets with re.match against module names).
    for name, layer_mode in layers.items():
        for spelled in (name, transformers_key(name + ".weight").removesuffix(".weight")):
            hits = [g for g in groups if any(re.match(t[3:], spelled) for t in g["targets"])]
            assert [g["format"] for g in hits] == [registry.get(layer_mode).compressed.format], spelled
    assert load_config(dst) == load_config(wide_dirs[which])  # config.py reads past quantization_config
    with pytest.raises(ValueError, match="only the towers' layers"):
        target("multi_modal_projector.linear")


# --- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["pg1", "pg2"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prequantized_load_equals_quantizing_at_load(converted, wide_dirs, which, mode):
    stored_load = load_model(converted[which, mode], dtype=DTYPE, chunk_bytes=4096)  # as stored: no quantize option
    at_load_load = load_model(wide_dirs[which], dtype=DTYPE, quantize=mode)
    assert stored_load.quantize == at_load_load.quantize == mode
    stored, at_load = stored_load.model, at_load_load.model
    a, b = _params(stored), _params(at_load)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert any(isinstance(m, Int4Linear) for m in stored.modules()) == (mode == "int4")
    assert load_model(converted[which, mode], dtype=DTYPE, quantize=mode).quantize == mode  # the same, said
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(OptionError, match=f"stored quantized to {mode}; load it as stored"):
        load_model(converted[which, mode], quantize=other)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_zero_copy_maps_what_is_stored_as_loaded(converted, mode):
    dst = converted["pg2", mode]
    copied = load_model(dst, dtype=DTYPE).model
    mapped = load_model(dst, dtype=DTYPE, zero_copy=True).model  # int4 layers and the embedding: filled while loading
    a, b = _params(copied), _params(mapped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Two int8 layers of one shard are views of one mapping: their addresses differ by their file offsets.
    entries = read_checkpoint(dst)
    int8 = [n for n, m in mapped.named_modules() if type(m) is Int8Linear]
    first = entries[int8[0] + ".weight"]
    second = next(entries[n + ".weight"] for n in int8[1:] if entries[n + ".weight"].path == first.path)
    address = {n: mapped.get_submodule(n.removesuffix(".weight")).weight.data_ptr() for n in (first.key, second.key)}
    assert address[second.key] - address[first.key] == second.offset - first.offset
    with pytest.raises(CheckpointError, match="zero-copy needs a checkpoint stored in float16"):
        load_model(dst, dtype=torch.float16, zero_copy=True)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of a single-shard checkpoint directory with its tensors (or config) edited."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_prequantized_tensors_are_refused(converted, tmp_path):
    src = converted["pg2", "int4"]
    layer = "language_model.model.layers.1.mlp.up_proj"  # int4 (256 x 128)

    def wrong_shape(t, c):
        t[layer + ".weight_shape"] = torch.tensor([256, 256])

    def both_forms(t, c):
        t[layer + ".weight"] = torch.zeros(256, 128, dtype=DTYPE)

    def int8_where_int4(t, c):
        del t[layer + ".weight_packed"], t[layer + ".weight_shape"]
        t[layer + ".weight"] = torch.zeros(256, 128, dtype=torch.int8)

    cases = [(wrong_shape, "weight_shape holds \\[256, 256\\], its int4 layer is \\[256, 128\\]"),
             (both_forms, "another tensor does too"), (int8_where_int4, "is stored as int8, not")]  # fmt: skip
    for edit, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_model(_rewrite(src, tmp_path / edit.__name__, edit), dtype=DTYPE)


def _set(path: str, value):
    def edit(t, c):
        *keys, last = path.split(".")
        node = c["quantization_config"]
        for k in keys:
            node = node[k]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda t, c: c.update(quantization_config=[1, 2]), "quantization_config is \\[1, 2\\]"),
        (_set("quant_method", "gptq"), 'quant_method is "gptq"'),
        (_set("quantization_status", "frozen"), 'quantization_status is "frozen"'),
        (_set("config_groups", {}), "config_groups is {}"),
        (_set("config_groups.group_0.weights.num_bits", 3), "group_0.weights.num_bits is 3"),
        (_set("config_groups.group_0.weights.group_size", 64), "group_0.weights.group_size is 64"),
        (_set("config_groups.group_0.weights.symmetric", False), "group_0.weights.symmetric is false"),
        (_set("config_groups.group_1.weights.strategy", "tensor"), 'group_1.weights.strategy is "tensor"'),
        (_set("config_groups.group_1.format", "pack-quantized"), 'group_1.format is "pack-quantized"'),
        (_set("config_groups.group_1.input_activations", {"num_bits": 8}), "group_1.input_activations is"),
    ],
)
def test_malformed_quantization_config_is_one_line(converted, tmp_path, edit, field):
    bad = _rewrite(converted["pg2", "int4"], tmp_path / "bad", edit)
    with pytest.raises(ConfigError) as info:
        load_model(bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(bad / "config.json"))
    assert re.search(field, message), message
    assert "lowmem_paligemma reads int8 per channel (naive-quantized) or int4 in groups of 128" in message


def test_convert_refuses_a_prequantized_source(converted, tmp_path):
    with pytest.raises(CheckpointError, match="already stored quantized"):
        convert_checkpoint(converted["pg1", "int8"], tmp_path / "again", quantize="int4")
    with pytest.raises(ValueError, match="quantize must be one of int8, int4"):
        convert_checkpoint(converted["pg1", "int8"], tmp_path / "x", quantize="int3")


# --- memory ----------------------------------------------------------------------------------------------------


def test_quantizing_convert_keeps_the_plain_convert_memory_bound(tmp_path):
    # One decoder layer with 65536-wide MLPs: three 32 MB bf16 tensors to quantize; quantizing one whole would
    # take FILL_BYTES_PER_ELEMENT (float32 copies, codes) x 16.8 M elements = 268 MB of temporaries.
    cfg = tiny(num_hidden_layers=1, hidden_size=256, intermediate_size=65536)
    src = write_checkpoint(tmp_path / "src", cfg, dtype=torch.bfloat16, max_shard_bytes=100 * MB, tokenizer=False)
    largest = max(e.numel for e in read_checkpoint(src).values())
    chunk = 8 << 20
    growth = convert_growth(src, tmp_path / "dst", chunk, quantize="int4")
    bound = 3 * chunk + 64 * MB  # tests/pretrained/test_convert.py's bound for the plain convert
    assert growth["anon"] < bound, growth
    assert growth["rss"] < bound, growth
    if growth["hwm"] is not None:
        assert growth["hwm"] < bound, growth
    assert bound < largest * FILL_BYTES_PER_ELEMENT / 2  # quantizing one tensor whole would not fit under it
    entries = read_checkpoint(tmp_path / "dst")
    assert entries["language_model.model.layers.0.mlp.down_proj.weight_packed"].shape == (256, 65536 // 8)


# --- transformers reads the same directory --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["pg1", "pg2"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_transformers_loads_our_checkpoint_to_the_same_logits(converted, which, mode):
    pytest.importorskip("compressed_tensors")
    from transformers import PaliGemmaForConditionalGeneration as HFModel

    dst = converted[which, mode]
    # float32 on both sides: q * scale is exact, so the weights are equal and the logits differ by float rounding.
    theirs, info = HFModel.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = load_model(
        dst, dtype=torch.float32, kernels="reference"
    ).model  # weight-only kernels, no activation rounding
    cfg = ours.cfg
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((2, cfg.num_image_tokens), cfg.image_token_index), torch.full((2, 1), 2),
                     torch.randint(10, 1500, (2, 12), generator=g)], 1)  # fmt: skip
    pixels = torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    with torch.no_grad():
        theirs(input_ids=ids[:, :-1], pixel_values=pixels, token_type_ids=torch.zeros_like(ids[:, :-1]))
        # compressed-tensors decompresses on the first forward: now every layer holds q * scale.
        hf = dict(theirs.named_parameters())
        for name, module in ours.named_modules():
            if isinstance(module, (Int8Linear, Int4Linear)) and not name.endswith("embed_tokens"):
                assert torch.equal(hf[transformers_key(name + ".weight")], dequantize(module)), name
        # transformers keeps the embedding dense (it cannot load it quantized); ours quantized it while loading.
        theirs.model.language_model.embed_tokens.weight.copy_(dequantize(ours.language_model.model.embed_tokens))
        want = theirs(input_ids=ids, pixel_values=pixels, token_type_ids=torch.zeros_like(ids)).logits
        got = ours(ids, pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
