"""The runtime every front end shares: sessions, one prompt with its timings, the option defaults."""

import math
from dataclasses import replace

import torch
from PIL import Image

from lowmem_paligemma.generate import generate
from lowmem_paligemma.pretrained import load_model
from lowmem_paligemma.runtime import Generation, LoadOptions, SamplingOptions, load_session, run_prompt
from lowmem_paligemma.safetensors_io import WEIGHT_DTYPES


def test_tokens_per_second_ignores_the_prefill_token():
    gen = Generation("x", [5, 6, 7], prompt_tokens=20, prefill_s=1.0, decode_s=0.5)
    assert math.isclose(gen.tokens_per_s, 4.0)
    assert Generation("x", [5], 20, 1.0, 0.0).tokens_per_s is None


def test_run_prompt_equals_generate_and_streams_the_same_text(tiny_pg2_dir):
    session = load_session(tiny_pg2_dir, LoadOptions(dtype="float32"))
    assert session.options.dtype in WEIGHT_DTYPES and session.weight_bytes > 0 and session.load_s > 0
    image = Image.linear_gradient("L").convert("RGB")
    x = session.processor(image, "caption en")
    want = list(generate(session.model, x["input_ids"], x["token_type_ids"], pixel_values=x["pixel_values"],
                         max_new_tokens=12))  # fmt: skip
    pieces: list[str] = []
    gen = run_prompt(session, session.encode(image), "caption en", SamplingOptions(max_new_tokens=12), pieces.append)
    assert gen.token_ids == want and len(set(want)) > 2  # a degenerate answer would prove nothing
    assert "".join(pieces) == gen.text == session.processor.decode(want)
    assert gen.prompt_tokens == x["input_ids"].shape[1] and gen.prefill_s > 0


def test_load_options_reach_the_model(tiny_pg1_dir):
    session = load_session(tiny_pg1_dir, LoadOptions(dtype="float16"))
    assert {p.dtype for p in session.model.parameters()} == {torch.float16}
    assert LoadOptions().preflight and SamplingOptions().temperature == 0.0


def test_a_budget_reaches_the_model_and_counts_only_resident_weights(tiny_pg1_dir):
    full = load_session(tiny_pg1_dir, LoadOptions(dtype="bfloat16"))
    budgeted = load_session(tiny_pg1_dir, LoadOptions(dtype="bfloat16", max_memory=64 * 10**9), max_new_tokens=8)
    plan = budgeted.model.residency
    assert plan.budget == 64 * 10**9 and plan.parts["request (KV cache, activations)"] > 0
    assert budgeted.streamer is None and budgeted.weight_bytes == full.weight_bytes  # everything fits
    streamed_plan = replace(plan, streamed=(plan.units[-1].name,), buffers=1, buffer_bytes=plan.units[-1].buffer_bytes)
    model = load_model(tiny_pg1_dir, dtype=torch.bfloat16, max_memory=streamed_plan)
    session = type(full)(model, full.processor, 0.0, LoadOptions(dtype="bfloat16"))
    assert session.streamer is model.streamer and session.weight_bytes < full.weight_bytes
    session.close()
    assert not model.streamer._thread.is_alive()
