"""The runtime every front end shares: sessions, one prompt with its timings, the option defaults."""

import math

import torch
from PIL import Image

from lowmem_paligemma.generate import generate
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
