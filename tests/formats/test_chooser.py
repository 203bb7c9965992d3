"""The kernel chooser: times on this machine, caches by machine and shape, never trusts a bad cache blindly, and
never caches a timing a busy machine took."""

import json
import random

import pytest
import torch

from lowmem_paligemma import load_model
from lowmem_paligemma.formats import chooser as kernels
from lowmem_paligemma.formats import registry
from lowmem_paligemma.formats.base import KernelChoice
from lowmem_paligemma.formats.dense import Linear
from lowmem_paligemma.formats.int8 import Int8Linear
from lowmem_paligemma.formats.kernels import use_kernels
from lowmem_paligemma.model.generate import generate
from lowmem_paligemma.pretrained.build import quantize_layers

DENSE, INT8 = registry.get("dense"), registry.get("int8")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(kernels.ENV_KERNELS, raising=False)
    monkeypatch.setattr(kernels, "MIN_SAMPLE_S", 0.0005)
    monkeypatch.setattr(kernels, "BUSY_LIMIT", 1.0)  # the test suite's other processes are not what is tested here
    monkeypatch.setattr(kernels, "SPREAD_LIMIT", 1e9)
    return tmp_path / "kernels.json"


def _model():
    with torch.device("meta"):
        model = torch.nn.Sequential(Linear(64, 48), Linear(32, 16))
        model.add_module("q", Int8Linear(64, 96, bias=False))
    return model


def _choose(**kw):
    return kernels.choose_kernels(_model(), torch.bfloat16, "cpu", prompt_rows=256, **kw)


def test_measures_then_reads_the_cache(cache, monkeypatch):
    report = _choose()
    assert set(report.plan) == {"dense", "int8"}
    assert {m.source for m in report.details} == {"measured"}
    int8 = next(m for m in report.details if m.what.startswith("int8"))
    assert {"decode int8pack", "decode dequant", "prefill dequant", "prefill int_mm"} <= set(int8.seconds)
    decode = min(INT8.available_kernels(torch.bfloat16) and [k for k in INT8.decode_kernels
                 if f"decode {k}" in int8.seconds], key=lambda k: int8.seconds[f"decode {k}"])  # fmt: skip
    assert report.plan["int8"].decode == decode  # no layout ties int8's phases: each is its own fastest
    entries = json.loads(cache.read_text())["entries"]
    assert any("48x64" in k for k in entries) and any("96x64" in k for k in entries)  # the largest layer per format
    monkeypatch.setattr(kernels, "_measure", lambda *a: pytest.fail("measured although cached"))
    again = _choose()
    assert again.plan == report.plan and {m.source for m in again.details} == {"cache"}


@pytest.mark.parametrize(
    "content",
    [b"\x00garbage{", b"[1, 2]", b'{"version": 99, "entries": {}}',
     None],  # None: a well-formed file whose entries claim kernels that do not exist
)  # fmt: skip
def test_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(cache, content):
    first = _choose()
    if content is None:
        doc = json.loads(cache.read_text())
        for entry in doc["entries"].values():
            entry["choice"] = "rm -rf /"
        content = json.dumps(doc).encode()
    cache.write_bytes(content)
    report = _choose()
    assert {m.source for m in report.details} == {"measured"}
    assert set(report.plan) == set(first.plan)
    doc = json.loads(cache.read_text())  # rewritten, valid again
    assert doc["version"] == kernels.CACHE_VERSION and all(e["choice"] != "rm -rf /" for e in doc["entries"].values())


class _NoisyClock:
    """A timer on a busy machine: each interval is 1 ms, or 10 ms when the scheduler ran something else (seeded)."""

    def __init__(self):
        self.t, self.rng = 0.0, random.Random(0)

    def __call__(self) -> float:
        self.t += 0.01 if self.rng.random() < 0.5 else 0.001
        return self.t


def test_a_noisy_timing_decides_this_load_but_is_never_cached(cache, monkeypatch):
    monkeypatch.setattr(kernels, "SPREAD_LIMIT", 1.25)
    real = kernels.time_candidates

    def noisy(calls, **kw):  # every candidate's runs spread 3x: a scheduler that keeps taking the core away
        timing = real(calls, **kw)
        return kernels.Timing(timing.seconds, dict.fromkeys(timing.spread, 3.0), timing.others_busy)

    monkeypatch.setattr(kernels, "time_candidates", noisy)
    report = _choose()
    assert all(m.source.startswith("measured, noisy") and "spread" in m.source for m in report.details)
    assert set(report.plan) == {"dense", "int8"}  # still a plan for this load
    assert not cache.exists()  # nothing cached: the next load times again
    monkeypatch.setattr(kernels, "time_candidates", real)
    monkeypatch.setattr(kernels, "SPREAD_LIMIT", 1e9)  # microsecond kernels on tiny shapes spread whatever the load
    quiet = _choose()
    assert {m.source for m in quiet.details} == {"measured"} and cache.exists()


def test_a_noisy_choice_keeps_each_phases_decisive_winner_only():
    """Under noise a phase keeps the reference's kernel unless a candidate beats it by DECISIVE in that phase: a
    decode twice as fast is kept though the prefill (most of a request) has no decisive winner, and a layout that
    ties both phases is given up when only one phase wins decisively."""
    seconds = {"decode packed": 0.8e-3, "decode native": 1.0e-3, "decode linear": 2.0e-3, "decode mv": 2.2e-3,
               "prefill packed": 18e-3, "prefill linear": 20e-3, "prefill upcast": 100e-3,
               "relayout packed": 1e-3}  # fmt: skip
    assert kernels._best(DENSE, seconds, 256) == KernelChoice("packed", "packed")
    assert kernels._noisy_choice(DENSE, seconds, 256, True, None, 1.0) == KernelChoice("native", "linear")
    close = seconds | {"decode native": 1.6e-3, "decode packed": 1.5e-3}  # 1.25x, 1.33x: within the noise
    assert kernels._noisy_choice(DENSE, close, 256, True, None, 1.0) == DENSE.reference
    both = seconds | {"prefill packed": 10e-3}  # 2x in both phases: the layout is decisive
    assert kernels._noisy_choice(DENSE, both, 256, True, None, 1.0) == KernelChoice("packed", "packed")


def test_other_processes_busy_make_a_timing_noisy(cache, monkeypatch):
    monkeypatch.setattr(kernels, "BUSY_LIMIT", 0.15)
    monkeypatch.setattr(kernels._BusyMeter, "share", lambda self: 0.6)
    report = _choose()
    assert all("other processes used 60% of the CPU" in m.source for m in report.details)
    assert not cache.exists()


def test_a_noisy_dtype_choice_is_not_cached(cache, monkeypatch):
    monkeypatch.setattr(kernels, "BUSY_LIMIT", 0.15)
    monkeypatch.setattr(kernels._BusyMeter, "share", lambda self: 0.6)
    first = kernels.choose_dtype((64, 128), 300, "cpu")
    assert first.source.startswith("measured, noisy")
    assert not cache.exists() or not any(k.startswith("dtype|") for k in json.loads(cache.read_text())["entries"])


def test_retune_times_anew_and_replaces_the_entry(cache, monkeypatch):
    _choose()
    stamps = {k: e["seconds"] for k, e in json.loads(cache.read_text())["entries"].items()}
    again = _choose(retune=True)
    assert {m.source for m in again.details} == {"measured"}
    now = {k: e["seconds"] for k, e in json.loads(cache.read_text())["entries"].items()}
    assert now.keys() == stamps.keys() and now != stamps  # new timings written over the old


def test_an_entry_without_a_candidate_available_now_is_timed_again(cache, monkeypatch):
    """A kernel added since the entry was written (an upgrade, a native build that failed before) gets timed."""
    _choose()
    doc = json.loads(cache.read_text())
    for entry in doc["entries"].values():
        entry["seconds"].pop(next(iter(sorted(entry["seconds"]))))
    cache.write_text(json.dumps(doc))
    again = _choose()
    assert {m.source for m in again.details} == {"measured"}
    assert all(len(e["seconds"]) > len(d["seconds"]) for e, d in zip(
        json.loads(cache.read_text())["entries"].values(), doc["entries"].values(), strict=True))  # fmt: skip


def test_a_layouts_reorder_is_charged_to_the_requests_a_load_serves():
    """oneDNN's packed layout wins each request by a little and costs a reorder at load: worth it for a server (many
    requests: None), not for one answer per load (the CLI's generate) when the reorder outweighs the gain."""
    seconds = {"decode packed": 0.8e-3, "decode native": 1.0e-3, "decode linear": 3e-3, "decode mv": 3e-3,
               "prefill packed": 18e-3, "prefill linear": 20e-3, "prefill upcast": 100e-3,
               "relayout packed": 40e-3}  # fmt: skip
    assert kernels._best(DENSE, seconds, 256) == KernelChoice("packed", "packed")
    assert kernels._best(DENSE, seconds, 256, requests=1000, layers=50) == KernelChoice("packed", "packed")
    assert kernels._best(DENSE, seconds, 256, requests=1, layers=50) == KernelChoice("native", "linear")
    assert kernels._best(DENSE, seconds, 256, requests=1, layers=0.01) == KernelChoice("packed", "packed")


def test_the_reorder_is_timed_and_reaches_the_choice(cache):
    if "packed" not in DENSE.available_kernels(torch.bfloat16):
        pytest.skip("oneDNN cannot pack weights on this machine")
    report = _choose()
    dense = next(m for m in report.details if m.what.startswith("dense"))
    assert dense.seconds["relayout packed"] > 0
    model = _model()
    assert kernels.format_weights(model) == {"dense": 64 * 48 + 32 * 16, "int8": 96 * 64}
    one = kernels.choose_kernels(model, torch.bfloat16, "cpu", prompt_rows=256, requests=1)
    assert {m.source for m in one.details} == {"cache"}  # the same timings, weighed for one request


def test_a_prefill_is_timed_on_the_layer_and_its_transpose_in_turn(monkeypatch):
    """A model's prefill runs layers of different shapes one after another (oneDNN's int8 GEMM slowed by a third
    when two shapes alternated): the prefill candidates see the layer and its transpose in turn, the decode the
    layer alone, and the prefill's seconds are per layer."""
    seen: list[tuple[str, tuple[int, int], int]] = []

    def bench(shape, dtype):
        return lambda x, name: seen.append((name, shape, x.shape[0]))

    monkeypatch.setattr(INT8, "bench", bench)
    monkeypatch.setattr(kernels, "time_candidates", lambda calls, phase: _run_each(calls))
    timing = kernels._measure(INT8, (96, 64), torch.bfloat16)
    prefill = {shape for name, shape, rows in seen if rows == kernels.PREFILL_ROWS}
    decode = {shape for name, shape, rows in seen if rows == 1}
    assert prefill == {(96, 64), (64, 96)} and decode == {(96, 64)}
    assert all(v == (0.5 if k.startswith("prefill") else 1.0) for k, v in timing.seconds.items())


def _run_each(calls):
    for call in calls.values():
        call()
    return kernels.Timing({name: 1.0 for name in calls}, {name: 1.0 for name in calls}, 0.0)


def test_a_noisy_clock_is_seen_as_noise():
    """The timer of a busy machine (random 10x intervals) gives spreads the chooser calls noisy."""
    timing = kernels.time_candidates({"a": lambda: None, "b": lambda: None}, clock=_NoisyClock())
    assert timing.noisy and "spread" in timing.why_noisy()


def test_time_candidates_rates_by_the_fastest_of_interleaved_rounds():
    order = []
    clock = iter(range(10_000)).__next__  # each call of the clock advances by 1 s: one call per sample
    timing = kernels.time_candidates({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                     clock=lambda: float(clock()))  # fmt: skip
    assert order[:2] == ["a", "b"]  # the warm-ups, then rounds alternate
    assert order[2:] == ["a", "b"] * kernels.ROUNDS
    assert timing.seconds == {"a": 1.0, "b": 1.0} and timing.spread == {"a": 1.0, "b": 1.0}


def test_a_layout_serves_both_phases():
    seconds = {"decode linear": 3.0, "decode mv": 2.0, "decode packed": 2.5, "prefill linear": 10.0,
               "prefill packed": 11.0}  # fmt: skip
    # mv + linear: 10 + 32 * 2 = 74 beats packed + packed: 11 + 32 * 2.5 = 91 (prefill of 256 rows)
    assert kernels._best(DENSE, seconds, 256) == KernelChoice("mv", "linear")
    seconds["decode packed"] = 1.5  # 11 + 48 = 59
    assert kernels._best(DENSE, seconds, 256) == KernelChoice("packed", "packed")
    assert kernels._best(DENSE, seconds | {"prefill packed": 100.0}, 256) == KernelChoice("mv", "linear")
    assert kernels._best(DENSE, seconds, 256, relayout=False) == KernelChoice("mv", "linear")


def test_overrides_by_spec_and_environment(cache, monkeypatch):
    report = _choose(spec="int8=int8pack/int_mm")
    assert report.plan["int8"] == KernelChoice("int8pack", "int_mm")
    assert DENSE.valid_choice(report.plan["dense"].decode, report.plan["dense"].prefill)
    monkeypatch.setenv(kernels.ENV_KERNELS, "reference")
    assert _choose().plan == {"dense": DENSE.reference, "int8": INT8.reference}
    for bad in ("int8=fast/dequant", "int9=int8pack/dequant", "dense=linear", "dense=packed/linear"):
        with pytest.raises(ValueError, match="kernel spec"):
            kernels.parse_spec(bad)


def test_dtype_is_measured_and_cached(cache):
    first = kernels.choose_dtype((64, 128), 300, "cpu")
    assert first.choice in ("bfloat16", "float16") and set(first.seconds) == {"bfloat16", "float16"}
    again = kernels.choose_dtype((64, 128), 300, "cpu")
    assert again.source == "cache" and again.choice == first.choice


def test_load_model_applies_the_plan(cache, tiny_pg1_dir):
    loaded = load_model(tiny_pg1_dir, dtype="auto", quantize="int8", kernels="int8=int8pack/int_mm")
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.kernels == KernelChoice("int8pack", "int_mm") for m in layers)
    assert loaded.dtype in (torch.bfloat16, torch.float16)
    assert any(line.startswith("int8 kernels (decode/prefill): int8pack/int_mm (override") for line in
               loaded.kernels.lines())  # fmt: skip
    ref = load_model(tiny_pg1_dir, kernels="reference").model
    assert all(m.kernels == DENSE.reference for m in ref.modules() if isinstance(m, Linear))


def test_layer_shapes_skip_the_embedding():
    from lowmem_paligemma.model.config import tiny
    from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = quantize_layers(PaliGemmaForConditionalGeneration(tiny()), "int8")
    shapes = kernels.layer_shapes(model)
    assert shapes["int8"] == (128, 64)  # an MLP, not the (1728, 64) embedding table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_compute_what_the_reference_does(tiny_pg2_dir, dtype):
    """Greedy tokens equal in float32; in bfloat16 the blocked kernel sums in another order, so the logits are
    compared within bf16 rounding instead (random tiny weights have near-ties a rounding can flip)."""
    if "packed" not in DENSE.available_kernels(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    ref = load_model(tiny_pg2_dir, dtype=dtype, kernels="reference").model
    packed = load_model(tiny_pg2_dir, dtype=dtype, kernels="dense=packed/packed").model
    layer = packed.language_model.model.layers[0].mlp.up_proj
    assert layer.weight.is_mkldnn and not ref.language_model.model.layers[0].mlp.up_proj.weight.is_mkldnn
    assert not packed.language_model.model.embed_tokens.weight.is_mkldnn  # the table's rows are gathered
    cfg = ref.cfg
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 41, 108]])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    with torch.inference_mode():
        want_logits, got_logits = ref(ids, pixels).float(), packed(ids, pixels).float()
    scale = want_logits.abs().max()
    assert (got_logits - want_logits).abs().max() <= (1e-5 if dtype == torch.float32 else 0.05) * scale
    if dtype == torch.float32:
        want = list(generate(ref, ids, pixel_values=pixels, max_new_tokens=10, eos_token_ids=[]))
        assert list(generate(packed, ids, pixel_values=pixels, max_new_tokens=10, eos_token_ids=[])) == want
    use_kernels(packed, {"dense": DENSE.reference})  # back to the plain layout
    assert not layer.weight.is_mkldnn
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids, pixels), ref(ids, pixels), rtol=0, atol=0)
