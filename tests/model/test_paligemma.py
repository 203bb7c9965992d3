"""Ours vs transformers' PaliGemmaForConditionalGeneration (eager) on the same tiny checkpoints."""

import pytest
import torch
from hf_reference import hf_load, prompt_inputs, write_hf_checkpoint

from lowmem_paligemma import load_model
from lowmem_paligemma.model.config import tiny
from lowmem_paligemma.model.paligemma import make_attn_mask


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def checkpoint(request, tmp_path_factory):
    cfg = tiny(gemma2=request.param == "gemma2")
    if cfg.is_gemma2:  # the features this test exists to catch
        assert cfg.text.num_key_value_heads < cfg.text.num_attention_heads
        assert cfg.text.query_pre_attn_scalar != cfg.text.head_dim
        assert cfg.text.sliding_window < 28
    return cfg, write_hf_checkpoint(cfg, tmp_path_factory.mktemp(request.param))


# Ours uses SDPA where there is no soft-cap, as transformers does by default; against that default it is
# bit-equal in float32 and bfloat16. Against transformers' eager path the kernels round differently:
# float32 stays within 1e-5, bfloat16 within bfloat16 noise amplified by the x3 test weights.
@pytest.mark.parametrize(
    "dtype, attn, tol",
    [
        (torch.float32, "eager", 1e-5),
        (torch.float32, None, 0.0),
        (torch.bfloat16, None, 0.0),
        (torch.bfloat16, "eager", 0.3),
    ],
)
def test_logits_match_transformers(checkpoint, dtype, attn, tol):
    cfg, path = checkpoint
    ids, tt, am, pv = prompt_inputs(cfg)
    ref, ours = hf_load(path, dtype, attn), load_model(path, dtype=dtype).model
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv, token_type_ids=tt, attention_mask=am).logits.float()
        got = ours(ids, pv, tt, am).float()
    assert got.shape == (2, ids.shape[1], cfg.text.vocab_size)
    assert want.abs().max() > 1.0  # not a degenerate model
    assert (got - want).abs().max().item() <= tol


def test_padding_and_last_only_match(checkpoint):
    cfg, path = checkpoint
    ids, tt, am, pv = prompt_inputs(cfg)
    am[1, :3] = 0  # left padding on the second row
    ref, ours = hf_load(path, torch.float32), load_model(path, dtype=torch.float32).model
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv, token_type_ids=tt, attention_mask=am).logits
        got = ours(ids, pv, tt, am)
        last = ours(ids, pv, tt, am, last_only=True)
    assert (got - want)[:, 3:].abs().max().item() <= 1e-5
    # The head over one row and over all rows may run different GEMM kernels, so sums in another order: a few fp32
    # units apart (5 at |logit| ~ 2.9 on an AVX2-only Zen 3); the wrong position would be off by ~1.
    torch.testing.assert_close(last[:, 0], got[:, -1], rtol=2e-6, atol=1e-6)


def test_ignoring_token_types_changes_logits(checkpoint):
    """The prefix block matters: treating the suffix as prefix gives other logits (the test can fail)."""
    cfg, path = checkpoint
    ids, tt, am, pv = prompt_inputs(cfg)
    ours = load_model(path, dtype=torch.float32).model
    with torch.no_grad():
        a, b = ours(ids, pv, tt, am), ours(ids, pv, torch.zeros_like(tt), am)
    assert (a - b).abs().max() > 1e-3


def test_image_token_count_must_match(checkpoint):
    cfg, path = checkpoint
    ids, tt, am, pv = prompt_inputs(cfg)
    ours = load_model(path, dtype=torch.float32).model
    with pytest.raises(ValueError, match="<image> tokens"):
        ours(ids[:, 1:], pv, tt[:, 1:], am[:, 1:])


def test_make_attn_mask_docstring_example():
    tt = torch.tensor([[0, 0, 0, 1, 1]])
    allowed = make_attn_mask(tt, None, 0, None, torch.float32)[0, 0] == 0
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    assert torch.equal(allowed, want)
    # A window of 2 on the causal part; the prefix block stays whole (transformers' sliding overlay).
    allowed = make_attn_mask(tt, None, 0, 2, torch.float32)[0, 0] == 0
    assert allowed[:3, :3].all() and allowed[4].tolist() == [False, False, False, True, True]
    # Decoding one token at position 4 over 5 keys, with the first key padded.
    step = make_attn_mask(tt, torch.tensor([[0, 1, 1, 1, 1]]), 4, None, torch.float32)
    assert step.shape == (1, 1, 1, 5) and (step[0, 0, 0] == 0).tolist() == [False, True, True, True, True]


@pytest.mark.parametrize("gemma2", [False, True])
def test_long_prompts_attend_a_chunk_of_queries_at_a_time_to_the_same_logits(
    gemma2, monkeypatch, tiny_pg1_dir, tiny_pg2_dir
):
    """Queries in chunks (an 896-px prompt's 4,100 rows, here 5 of the tiny model's 20 + 16 patches): the logits of all
    queries at once (the path the transformers parity tests check bit for bit) up to float32 summation order, and the
    same greedy tokens, in the vision tower and in the decoder (Gemma 2's window and caps too)."""
    from lowmem_paligemma import defaults

    model = load_model(tiny_pg2_dir if gemma2 else tiny_pg1_dir, dtype=torch.float32).model
    cfg = model.cfg
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2] + list(range(300, 319)) + [108]])
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    from lowmem_paligemma.model.generate import generate

    run = lambda: list(generate(model, ids, pixel_values=pixels, max_new_tokens=8, eos_token_ids=[]))  # noqa: E731
    with torch.inference_mode():
        whole, whole_tokens = model(ids, pixels), run()
        monkeypatch.setattr(defaults, "ATTENTION_QUERY_CHUNK", 5)
        chunked, chunked_tokens = model(ids, pixels), run()
    assert ids.shape[1] > 5 and cfg.num_image_tokens > 5
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert chunked_tokens == whole_tokens
