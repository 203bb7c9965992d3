"""The kernel chooser: measures on this machine, caches by machine and shape, never trusts a bad cache blindly."""

import json

import pytest
import torch

from lowmem_paligemma import load_model
from lowmem_paligemma.formats import chooser as kernels
from lowmem_paligemma.formats.ops import REFERENCE, KernelChoice, Linear
from lowmem_paligemma.formats.quant import Int8Linear, quantize_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(kernels.ENV_KERNELS, raising=False)
    monkeypatch.setattr(kernels, "TIME_PER_CANDIDATE_S", 0.01)
    return tmp_path / "kernels.json"


def _model():
    with torch.device("meta"):
        model = torch.nn.Sequential(Linear(64, 48), Linear(32, 16))
        model.add_module("q", Int8Linear(64, 96, bias=False))
    return model


def test_measures_then_reads_the_cache(cache, monkeypatch):
    report = kernels.choose_kernels(_model(), torch.bfloat16, "cpu")
    assert set(report.plan) == {"dense", "int8"}
    assert {m.source for m in report.details} == {"measured"}
    int8 = next(m for m in report.details if m.what.startswith("int8"))
    assert {"decode int8pack", "decode dequant", "prefill dequant", "prefill int_mm"} <= set(int8.seconds)
    decode = min(("int8pack", "dequant"), key=lambda k: int8.seconds[f"decode {k}"])
    assert report.plan["int8"].decode == decode  # no layout ties int8's phases: each is its own fastest
    entries = json.loads(cache.read_text())["entries"]
    assert any("48x64" in k for k in entries) and any("96x64" in k for k in entries)  # the largest layer per format
    monkeypatch.setattr(kernels, "_measure", lambda *a: pytest.fail("measured although cached"))
    again = kernels.choose_kernels(_model(), torch.bfloat16, "cpu")
    assert again.plan == report.plan and {m.source for m in again.details} == {"cache"}


@pytest.mark.parametrize(
    "content",
    [b"\x00garbage{", b"[1, 2]", b'{"version": 99, "entries": {}}',
     None],  # None: a well-formed file whose entries claim kernels that do not exist
)  # fmt: skip
def test_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(cache, content):
    first = kernels.choose_kernels(_model(), torch.bfloat16, "cpu")
    if content is None:
        doc = json.loads(cache.read_text())
        for entry in doc["entries"].values():
            entry["choice"] = "rm -rf /"
        content = json.dumps(doc).encode()
    cache.write_bytes(content)
    report = kernels.choose_kernels(_model(), torch.bfloat16, "cpu")
    assert {m.source for m in report.details} == {"measured"}
    assert set(report.plan) == set(first.plan)
    doc = json.loads(cache.read_text())  # rewritten, valid again
    assert doc["version"] == kernels.CACHE_VERSION and all(e["choice"] != "rm -rf /" for e in doc["entries"].values())


def test_a_layout_serves_both_phases():
    seconds = {"decode linear": 3.0, "decode mv": 2.0, "decode packed": 2.5, "prefill linear": 10.0,
               "prefill packed": 11.0}  # fmt: skip
    # mv + linear: 10 + 32 * 2 = 74 beats packed + packed: 11 + 32 * 2.5 = 91 (prefill of 256 rows)
    assert kernels._best("dense", seconds, 256) == KernelChoice("mv", "linear")
    seconds["decode packed"] = 1.5  # 11 + 48 = 59
    assert kernels._best("dense", seconds, 256) == KernelChoice("packed", "packed")
    assert kernels._best("dense", seconds | {"prefill packed": 100.0}, 256) == KernelChoice("mv", "linear")


def test_overrides_by_spec_and_environment(cache, monkeypatch):
    report = kernels.choose_kernels(_model(), torch.bfloat16, "cpu", spec="int8=int8pack/int_mm")
    assert report.plan["int8"] == KernelChoice("int8pack", "int_mm")
    assert kernels.ops.valid_choice(report.plan["dense"].decode, report.plan["dense"].prefill)
    monkeypatch.setenv(kernels.ENV_KERNELS, "reference")
    assert kernels.choose_kernels(_model(), torch.bfloat16, "cpu").plan == {f: REFERENCE[f] for f in ("dense", "int8")}
    for bad in ("int8=fast/dequant", "int9=int8pack/dequant", "dense=linear", "dense=packed/linear"):
        with pytest.raises(ValueError, match="kernel spec"):
            kernels.parse_spec(bad)


def test_dtype_is_measured_and_cached(cache):
    first = kernels.choose_dtype((64, 128), 300, "cpu")
    assert first.choice in ("bfloat16", "float16") and set(first.seconds) == {"bfloat16", "float16"}
    again = kernels.choose_dtype((64, 128), 300, "cpu")
    assert again.source == "cache" and again.choice == first.choice


def test_load_model_applies_the_plan(cache, tiny_pg1_dir):
    model = load_model(tiny_pg1_dir, dtype="auto", quantize="int8", kernels="int8=int8pack/int_mm")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.kernels == KernelChoice("int8pack", "int_mm") for m in layers)
    assert model.dtype in (torch.bfloat16, torch.float16)
    assert any(line.startswith("int8 kernels (decode/prefill): int8pack/int_mm (override") for line in
               model.kernel_report.lines())  # fmt: skip
    ref = load_model(tiny_pg1_dir, kernels="reference")
    assert all(m.kernels == REFERENCE["dense"] for m in ref.modules() if isinstance(m, Linear))


def test_layer_shapes_skip_the_embedding():
    from lowmem_paligemma.model.config import tiny
    from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = quantize_model(PaliGemmaForConditionalGeneration(tiny()), "int8")
    shapes = kernels.layer_shapes(model)
    assert shapes["int8"] == (128, 64)  # an MLP, not the (1728, 64) embedding table


def test_packed_weights_compute_what_the_reference_does(tiny_pg2_dir):
    if "packed" not in kernels._available("dense", torch.bfloat16):
        pytest.skip("oneDNN cannot pack bfloat16 weights on this CPU")
    ref = load_model(tiny_pg2_dir, dtype=torch.bfloat16, kernels="reference")
    packed = load_model(tiny_pg2_dir, dtype=torch.bfloat16, kernels="dense=packed/packed")
    layer = packed.language_model.model.layers[0].mlp.up_proj
    assert layer.weight.is_mkldnn and not ref.language_model.model.layers[0].mlp.up_proj.weight.is_mkldnn
    assert not packed.language_model.model.embed_tokens.weight.is_mkldnn  # the table's rows are gathered
    cfg = ref.cfg
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108]])
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size) * 2 - 1
    from lowmem_paligemma.model.generate import generate

    want = list(generate(ref, ids, pixel_values=pixels, max_new_tokens=10, eos_token_ids=[]))
    assert list(generate(packed, ids, pixel_values=pixels, max_new_tokens=10, eos_token_ids=[])) == want
    kernels.ops.use_kernels(packed, {"dense": REFERENCE["dense"]})  # back to the plain layout
    assert not layer.weight.is_mkldnn
    assert list(generate(packed, ids, pixel_values=pixels, max_new_tokens=10, eos_token_ids=[])) == want
