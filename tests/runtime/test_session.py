"""The runtime every front end shares: sessions, one prompt or a batch with their timings, memory estimates."""

import math
from dataclasses import replace

import torch
from PIL import Image

from lowmem_paligemma import LoadOptions, SamplingOptions
from lowmem_paligemma.budget.memory import request_bytes
from lowmem_paligemma.checkpoint.safetensors_io import WEIGHT_DTYPES
from lowmem_paligemma.model.config import load_config
from lowmem_paligemma.model.gemma import KVCache
from lowmem_paligemma.model.generate import generate
from lowmem_paligemma.pretrained.load import load_memory_bytes, load_model
from lowmem_paligemma.runtime.session import (
    Generation,
    load_session,
    run_prompt,
    run_prompts,
    session_memory_bytes,
)


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
    plan = budgeted.loaded.residency
    assert plan.budget == 64 * 10**9 and plan.parts["request (KV cache, activations)"] > 0
    assert budgeted.loaded.streamer is None and budgeted.weight_bytes == full.weight_bytes  # everything fits
    streamed_plan = replace(plan, streamed=(plan.units[-1].name,), buffers=1, buffer_bytes=plan.units[-1].buffer_bytes)
    loaded = load_model(tiny_pg1_dir, dtype=torch.bfloat16, residency=streamed_plan)
    session = type(full)(loaded, full.processor, LoadOptions(dtype="bfloat16"), 0.0)
    assert session.loaded.streamer is not None and session.weight_bytes < full.weight_bytes
    session.close()
    assert not loaded.streamer._thread.is_alive()


def test_run_prompts_equals_run_prompt_row_by_row(tiny_pg1_dir):
    session = load_session(tiny_pg1_dir, LoadOptions(dtype="float32"))
    images = [Image.linear_gradient("L").convert("RGB"), Image.radial_gradient("L").convert("RGB").rotate(30)]
    prompts = ["caption en", "answer en what is in the middle of this picture?"]  # different lengths
    sampling = SamplingOptions(max_new_tokens=10)
    want = [run_prompt(session, session.encode(im), p, sampling) for im, p in zip(images, prompts)]
    features = torch.cat([session.encode(im) for im in images])
    got = run_prompts(session, features, prompts, sampling)
    assert [g.token_ids for g in got] == [w.token_ids for w in want] and want[0].token_ids != want[1].token_ids
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.prompt_tokens for g in got] == [w.prompt_tokens for w in want]
    assert all(g.prefill_s == got[0].prefill_s > 0 for g in got)  # one shared prefill


def test_session_memory_bytes_adds_the_batch_work_to_the_load(tiny_pg2_dir):
    options, sampling = LoadOptions(dtype="bfloat16"), SamplingOptions(max_new_tokens=20)
    cfg = load_config(tiny_pg2_dir)
    load = load_memory_bytes(tiny_pg2_dir, torch.bfloat16)
    one = session_memory_bytes(tiny_pg2_dir, options, "caption en", sampling, batch=1)
    eight = session_memory_bytes(tiny_pg2_dir, options, "caption en", sampling, batch=8)
    prompt_tokens = cfg.num_image_tokens + 1 + len("caption en\n")
    session = load_session(tiny_pg2_dir, LoadOptions(dtype="bfloat16"))
    assert prompt_tokens >= session.processor.prompt_inputs("caption en")[0].shape[1]  # the bound holds
    assert one == load + request_bytes(cfg, prompt_tokens, 20, torch.bfloat16).total
    cache = KVCache(cfg.text, 8, prompt_tokens + 20, torch.bfloat16, "cpu")
    assert eight - load > cache.k.nbytes + cache.v.nbytes > one - load  # the cache counted, per row
