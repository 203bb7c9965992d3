"""The kernel chooser: measures on this machine, caches by machine and shape, never trusts a bad cache blindly."""

import json

import pytest
import torch

from lowmem_paligemma import kernels, load_model
from lowmem_paligemma.ops import REFERENCE, KernelChoice, Linear
from lowmem_paligemma.quant import Int8Linear, quantize_model


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
    assert {m.source for m in report.details} == {"measured", "the only candidate"}
    decode = next(m for m in report.details if m.what == "int8 decode")
    assert set(decode.seconds) == {"int8pack", "dequant"} and decode.choice == min(
        decode.seconds, key=decode.seconds.get
    )
    entries = json.loads(cache.read_text())["entries"]
    assert any("48x64" in k for k in entries) and any("96x64" in k for k in entries)  # the largest layer per format
    monkeypatch.setattr(kernels, "_measure", lambda *a: pytest.fail("measured although cached"))
    again = kernels.choose_kernels(_model(), torch.bfloat16, "cpu")
    assert again.plan == report.plan and {m.source for m in again.details} == {"cache", "the only candidate"}


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
    assert {m.source for m in report.details} == {"measured", "the only candidate"}
    assert set(report.plan) == set(first.plan)
    doc = json.loads(cache.read_text())  # rewritten, valid again
    assert doc["version"] == kernels.CACHE_VERSION and all(e["choice"] != "rm -rf /" for e in doc["entries"].values())


def test_overrides_by_spec_and_environment(cache, monkeypatch):
    report = kernels.choose_kernels(_model(), torch.bfloat16, "cpu", spec="int8=int8pack/int_mm")
    assert report.plan["int8"] == KernelChoice("int8pack", "int_mm")
    assert report.plan["dense"] in (KernelChoice("linear", "linear"), KernelChoice("mv", "linear"))
    monkeypatch.setenv(kernels.ENV_KERNELS, "reference")
    assert kernels.choose_kernels(_model(), torch.bfloat16, "cpu").plan == {f: REFERENCE[f] for f in ("dense", "int8")}
    for bad in ("int8=fast/dequant", "int9=int8pack/dequant", "dense=linear"):
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
    assert any("int8 decode: int8pack (override" in line for line in model.kernel_report.lines())
    ref = load_model(tiny_pg1_dir, kernels="reference")
    assert all(m.kernels == REFERENCE["dense"] for m in ref.modules() if isinstance(m, Linear))


def test_layer_shapes_skip_the_embedding():
    from lowmem_paligemma.config import tiny
    from lowmem_paligemma.paligemma import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = quantize_model(PaliGemmaForConditionalGeneration(tiny()), "int8")
    shapes = kernels.layer_shapes(model)
    assert shapes["int8"] == (128, 64)  # an MLP, not the (1728, 64) embedding table
