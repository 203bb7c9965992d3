"""Residency planning: the request's memory, which layers stay, the minimum and its error; full-size models on meta."""

from dataclasses import replace

import pytest
import torch

from lowmem_paligemma import InsufficientMemoryError
from lowmem_paligemma.budget.memory import request_bytes as request_memory
from lowmem_paligemma.budget.residency import PROCESS as PROCESS_PART
from lowmem_paligemma.budget.residency import (
    RUN_SLACK_BYTES,
    plan_residency,
    scratch_bytes,
    spread,
    streamable_units,
)
from lowmem_paligemma.checkpoint.loader import checkpoint_plan
from lowmem_paligemma.model.config import PRESETS, tiny
from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration
from lowmem_paligemma.pretrained.build import build_model, quantize_layers
from lowmem_paligemma.pretrained.keys import TIED, normalize_key
from lowmem_paligemma.pretrained.synth import tiny_checkpoint
from lowmem_paligemma.units import GB, format_bytes

PROCESS = 400_000_000  # what a Python process with torch and a full-size tokenizer holds before loading


def _meta(preset: str, quantize: str | None = None) -> PaliGemmaForConditionalGeneration:
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(PRESETS[preset])
    return quantize_layers(model, quantize) if quantize else model


def request_bytes(cfg, prompt_tokens, new, dtype):
    return request_memory(cfg, prompt_tokens, new, dtype).total


def _request(model, dtype=torch.bfloat16, new=32):
    return request_bytes(model.cfg, model.cfg.num_image_tokens + 64, new, dtype)


def test_request_bytes_grow_by_the_kv_cache_per_token():
    cfg = PRESETS["paligemma2-10b-224"]
    t = cfg.text
    per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2  # k and v, bf16
    assert request_bytes(cfg, 300, 33, torch.bfloat16) - request_bytes(cfg, 300, 32, torch.bfloat16) == per_token
    assert request_bytes(cfg, 300, 32, torch.float32) > request_bytes(cfg, 300, 32, torch.bfloat16)
    # 896 px: 4096 image tokens, the attention scores of the prefill dominate (16 heads x 4160^2 x 8 bytes).
    assert request_bytes(PRESETS["paligemma2-10b-896"], 4160, 32, torch.bfloat16) > 2 * GB


def test_spread_keeps_layers_evenly_through_the_stack():
    assert spread(18, 4) == [2, 6, 11, 15]
    assert spread(5, 5) == [0, 1, 2, 3, 4]
    assert spread(7, 0) == []
    for n in range(1, 30):
        for k in range(n + 1):
            assert len(set(spread(n, k))) == k and all(0 <= i < n for i in spread(n, k))


@pytest.mark.parametrize(
    "preset, quantize, budget",
    [("paligemma-3b-224", None, 3 * GB), ("paligemma2-10b-224", None, 8 * GB), ("paligemma2-10b-224", "int8", 6 * GB)],
)
def test_full_size_budgets_plan_within_the_budget(preset, quantize, budget):
    model = _meta(preset, quantize)
    plan = plan_residency(model, budget, torch.bfloat16, _request(model), process_bytes=PROCESS)
    assert plan.minimum <= plan.total <= budget
    assert plan.streamed and plan.buffers == 2
    decoder = [u for u in plan.units if u.group == "decoder"]
    kept = [u for u in plan.resident_units if u.group == "decoder"]
    # A decoder layer is read per token, a vision layer per image: the vision tower goes first.
    assert all(u.name in plan.streamed for u in plan.units if u.group == "vision")
    assert 0 < len(kept) < len(decoder)
    assert [decoder.index(u) for u in kept] == spread(len(decoder), len(kept))
    # One more resident layer would not fit.
    assert plan.total + decoder[0].nbytes > budget
    assert plan.read_per_pass("decoder") == sum(u.stored_bytes for u in decoder if u.name in plan.streamed)


def test_more_budget_never_keeps_fewer_layers():
    model = _meta("paligemma-3b-224")
    request = _request(model)
    kept = [
        len(plan_residency(model, b * GB // 4, torch.bfloat16, request, process_bytes=PROCESS).resident_units)
        for b in range(8, 40)
    ]
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == len(streamable_units(model, torch.bfloat16))


def test_everything_fits_streams_nothing():
    model = _meta("paligemma-3b-224")
    plan = plan_residency(model, 64 * GB, torch.bfloat16, _request(model), process_bytes=PROCESS)
    assert plan.streamed == () and plan.buffers == 0 and plan.buffer_bytes == 0
    assert any("all resident" in line for line in plan.describe())


def test_below_the_minimum_is_one_error_naming_it():
    model = _meta("paligemma2-10b-224")
    request = _request(model)
    plan = plan_residency(model, 8 * GB, torch.bfloat16, request, process_bytes=PROCESS)
    with pytest.raises(InsufficientMemoryError) as err:
        plan_residency(model, plan.minimum - 1, torch.bfloat16, request, process_bytes=PROCESS)
    message = str(err.value)
    assert "\n" not in message and f"minimum {format_bytes(plan.minimum)}" in message and len(message) < 300
    # At the minimum itself it runs: every layer streamed, one buffer, no read-ahead.
    least = plan_residency(model, plan.minimum, torch.bfloat16, request, process_bytes=PROCESS)
    assert len(least.streamed) == len(least.units) and least.buffers == 1 and least.total <= plan.minimum


def test_the_process_and_the_request_count():
    model = _meta("paligemma-3b-224")
    small = plan_residency(model, 4 * GB, torch.bfloat16, _request(model, new=8), process_bytes=PROCESS)
    long = plan_residency(model, 4 * GB, torch.bfloat16, _request(model, new=4096), process_bytes=PROCESS)
    heavy = plan_residency(model, 4 * GB, torch.bfloat16, _request(model, new=8), process_bytes=PROCESS + GB)
    assert len(long.resident_units) <= len(small.resident_units)
    assert len(heavy.resident_units) < len(small.resident_units)
    assert small.parts[PROCESS_PART] == PROCESS and small.parts["slack"] == RUN_SLACK_BYTES


def test_describe_says_what_stays_and_what_a_token_costs():
    model = _meta("paligemma2-10b-224")
    plan = plan_residency(model, 8 * GB, torch.bfloat16, _request(model), process_bytes=PROCESS)
    text = "\n".join(plan.describe(read_rate=1.5 * GB))
    kept = len([u for u in plan.resident_units if u.group == "decoder"])
    assert f"decoder layers: {kept} of 42 resident" in text
    assert f"{format_bytes(plan.read_per_pass('decoder'))} read per token" in text
    assert f"at least {plan.read_per_pass('decoder') / (1.5 * GB):.2f} s per token" in text
    assert "vision layers: 0 of 27 resident" in text


def test_stored_sizes_and_conversion_come_from_the_checkpoint(tmp_path, tiny_pg1_dir):
    model = build_model(tiny_pg1_dir)[0]
    load_plan = checkpoint_plan(model, tiny_pg1_dir, normalize_key, TIED)
    fp32 = streamable_units(model, torch.bfloat16, load_plan)  # the fixture is stored in float32
    assert all(u.stored_bytes == 2 * u.nbytes and u.converts for u in fp32)
    bf16_dir = tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    model = build_model(bf16_dir)[0]
    same = streamable_units(model, torch.bfloat16, checkpoint_plan(model, bf16_dir, normalize_key, TIED))
    assert all(u.stored_bytes == u.nbytes and not u.converts for u in same)
    # Stored as computed, a layer's tensors lie together: one span, at most two blocks of alignment.
    assert all(u.nbytes < u.buffer_bytes <= u.nbytes + 2 * 4096 for u in same)


def test_int8_dequantization_buffer_is_counted_where_a_kernel_uses_it():
    model = _meta("paligemma2-10b-224", "int8")
    from lowmem_paligemma.formats.base import KernelChoice

    largest = 14336 * 3584 * 2  # the MLP's 16-bit copy
    assert scratch_bytes(model, {"int8": KernelChoice("int8pack", "dequant")}, torch.bfloat16) == largest
    assert scratch_bytes(model, {"int8": KernelChoice("int8pack", "int8pack")}, torch.bfloat16) == 0


def test_tiny_layers_smaller_than_their_streaming_costs_stay_resident():
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(replace(tiny(), text=tiny().text))
    base = plan_residency(model, 10 * GB, torch.bfloat16, 0, process_bytes=0)
    everything = sum(base.parts.values()) + sum(u.nbytes for u in base.units)
    plan = plan_residency(model, everything, torch.bfloat16, 0, process_bytes=0)
    assert plan.streamed == () and plan.total == everything
