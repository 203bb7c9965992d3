"""Generation: greedy equals transformers' generate token for token; cached decode equals a full forward;
batched rows equal the same prompts run alone."""

import importlib

import pytest
import torch

from lowmem_paligemma import load_model
from lowmem_paligemma.errors import ContextLengthError
from lowmem_paligemma.model.gemma import KVCache
from lowmem_paligemma.model.generate import decode_step, encode_image, generate, generate_batch, left_pad, prefill
from lowmem_paligemma.model.processor import Processor
from lowmem_paligemma.model.text_stream import TextStream

generate_module = importlib.import_module("lowmem_paligemma.model.generate")  # the package exports the function


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def loaded(request, tiny_pg1_dir, tiny_pg2_dir):
    path = tiny_pg1_dir if request.param == "pg1" else tiny_pg2_dir
    return path, load_model(path, dtype=torch.float32).model


def _prompt(cfg, seed, text=5):
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_image_tokens
    ids = torch.randint(5, 500, (1, n + 1 + text), generator=g)
    ids[:, :n], ids[:, n], ids[:, -1] = cfg.image_token_index, cfg.bos_token_id, 108
    return ids, torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_transformers_generate(loaded, seed):
    from transformers import PaliGemmaForConditionalGeneration as HFModel

    path, model = loaded
    cfg = model.cfg
    ids, pv = _prompt(cfg, seed)
    steps = 16
    if cfg.text.sliding_window:  # the window must bite during decoding
        assert cfg.text.sliding_window < ids.shape[1] + steps
    ref = HFModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    out = ref.generate(
        input_ids=ids, pixel_values=pv, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
        max_new_tokens=steps, do_sample=False, eos_token_id=None,
    )  # fmt: skip
    want = out[0, ids.shape[1] :].tolist()
    assert (
        len(set(want)) >= 4
    )  # a degenerate reference would prove nothing (docs/model.md, "Making tiny test models that can fail")
    got = list(generate(model, ids, pixel_values=pv, max_new_tokens=steps, eos_token_ids=[]))
    assert got == want


def test_cached_decode_equals_full_forward(loaded):
    _, model = loaded
    ids, pv = _prompt(model.cfg, 3)
    feats = encode_image(model, pv)
    extra = torch.tensor([[40, 41, 42, 43, 44, 45, 46, 47, 48, 49]])
    full_ids = torch.cat([ids, extra], 1)
    types = torch.cat([torch.zeros_like(ids), torch.ones_like(extra)], 1)
    cache = KVCache(model.cfg.text, 1, full_ids.shape[1], model.dtype, "cpu")
    steps = [prefill(model, ids, types[:, : ids.shape[1]], feats, cache)]
    for pos in range(ids.shape[1], full_ids.shape[1]):
        steps.append(decode_step(model, full_ids, types, pos, cache))
    with torch.no_grad():
        full = model(full_ids, token_type_ids=types, image_features=feats)[0, ids.shape[1] - 1 :]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-5)


def test_stops_at_eos_and_max_tokens(loaded):
    _, model = loaded
    ids, pv = _prompt(model.cfg, 0)
    tokens = list(generate(model, ids, pixel_values=pv, max_new_tokens=6, eos_token_ids=[]))
    assert len(tokens) == 6
    stopped = list(generate(model, ids, pixel_values=pv, max_new_tokens=6, eos_token_ids=[tokens[2]]))
    assert stopped == tokens[: tokens.index(tokens[2]) + 1]


def test_sampling_is_seeded(loaded):
    _, model = loaded
    ids, pv = _prompt(model.cfg, 0)
    feats = encode_image(model, pv)
    run = lambda seed: list(generate(model, ids, image_features=feats, max_new_tokens=12, temperature=1.5, seed=seed))
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_several_prompts_share_one_image_encoding(loaded, monkeypatch):
    _, model = loaded
    ids, pv = _prompt(model.cfg, 0)
    want = [list(generate(model, i, pixel_values=pv, max_new_tokens=5)) for i in (ids, ids[:, :-2])]
    calls = []
    original = model.vision_tower.forward
    monkeypatch.setattr(model.vision_tower, "forward", lambda x: calls.append(1) or original(x))
    feats = encode_image(model, pv)
    got = [list(generate(model, i, image_features=feats, max_new_tokens=5)) for i in (ids, ids[:, :-2])]
    assert got == want and len(calls) == 1


def test_text_stream_matches_full_decode(tiny_pg2_dir):
    proc = Processor.from_pretrained(tiny_pg2_dir)
    ids = proc.tokenizer("héllo wörld <loc0012> ok", add_special_tokens=False)["input_ids"] + [1]
    stream = TextStream(proc.tokenizer)
    text = "".join(stream.push(i) for i in ids)
    assert text == proc.tokenizer.decode(ids, skip_special_tokens=True) == "héllo wörld <loc0012> ok"


def test_generate_validates_arguments(loaded):
    _, model = loaded
    ids, pv = _prompt(model.cfg, 0)
    with pytest.raises(ValueError, match="one prompt"):
        generate(model, ids.repeat(2, 1), pixel_values=pv)  # at the call, not at the first token
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, pixel_values=pv, max_new_tokens=0)


def test_a_request_over_the_context_is_refused_before_any_allocation(loaded, monkeypatch):
    _, model = loaded
    ids, pv = _prompt(model.cfg, 0)
    context = model.cfg.text.max_position_embeddings
    assert context == 8192  # Gemma's, which the tiny configs keep
    allocated = []
    monkeypatch.setattr(generate_module, "KVCache", lambda *a: allocated.append(a))
    room = context - ids.shape[1]
    with pytest.raises(ContextLengthError, match=rf"= {context + 1} positions .* context of {context} .* {room} new"):
        generate(model, ids, pixel_values=pv, max_new_tokens=room + 1)
    with pytest.raises(ContextLengthError, match="the prompt alone fills it"):
        generate(model, torch.ones(1, context, dtype=torch.long), max_new_tokens=1)
    assert allocated == []
    assert generate(model, ids, pixel_values=pv, max_new_tokens=room) is not None  # exactly the context: fine


# --- batched generation ---------------------------------------------------------------------------------------------

TEXT_LENGTHS = (2, 9, 5, 14, 1)  # prompts of different lengths: every row but the longest is left-padded


def _batch(cfg, seed=10):
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for text in TEXT_LENGTHS:
        ids = torch.randint(5, 500, (1, cfg.num_image_tokens + 1 + text), generator=g)
        ids[:, : cfg.num_image_tokens], ids[:, cfg.num_image_tokens], ids[:, -1] = cfg.image_token_index, 2, 108
        prompts.append(ids)
    size = cfg.vision.image_size
    return prompts, torch.randn(len(prompts), 3, size, size, generator=g)


def _rows(steps: list[list[int | None]]) -> list[list[int]]:
    """Per-step lists -> per-row token lists, checking that a row, once stopped (None), stays stopped."""
    columns = list(zip(*steps))
    for column in columns:
        if None in column:
            assert set(column[column.index(None) :]) == {None}
    return [[t for t in column if t is not None] for column in columns]


def _eos_that_stops_rows_apart(alone: list[list[int]], steps: int) -> list[int]:
    """One token of the unbatched outputs that, as EOS, stops some row early and lets another run to the end."""
    for row in alone:
        for token in row[1:]:
            ends = [r.index(token) + 1 if token in r else steps for r in alone]
            if min(ends) < steps and max(ends) == steps and len(set(ends)) > 1:
                return [token]
    raise AssertionError("no token stops the rows at different steps")  # would make the test below vacuous


def test_batched_greedy_equals_alone_row_by_row(loaded):
    _, model = loaded
    cfg, steps = model.cfg, 12
    prompts, pv = _batch(cfg)
    if cfg.text.sliding_window:  # the window must bite, so that it has to count positions, not padded slots
        assert cfg.text.sliding_window < min(p.shape[1] for p in prompts)
    alone = [list(generate(model, p, pixel_values=pv[i : i + 1], max_new_tokens=steps, eos_token_ids=[]))
             for i, p in enumerate(prompts)]  # fmt: skip
    assert all(len(set(row)) >= 4 for row in alone)  # degenerate outputs would prove nothing
    assert _rows(list(generate_batch(model, prompts, pixel_values=pv, max_new_tokens=steps, eos_token_ids=[]))) == alone

    eos = _eos_that_stops_rows_apart(alone, steps)
    want = [list(generate(model, p, pixel_values=pv[i : i + 1], max_new_tokens=steps, eos_token_ids=eos))
            for i, p in enumerate(prompts)]  # fmt: skip
    got = list(generate_batch(model, prompts, pixel_values=pv, max_new_tokens=steps, eos_token_ids=eos))
    assert _rows(got) == want
    assert len(got) == steps and any(len(row) < steps for row in want)  # rows stopped early, the batch went on


def test_batched_sampling_with_a_seed_equals_alone(loaded):
    _, model = loaded
    prompts, pv = _batch(model.cfg, seed=11)
    feats = encode_image(model, pv)
    kw = {"max_new_tokens": 8, "temperature": 1.5, "top_k": 50, "seed": 3, "eos_token_ids": []}
    alone = [list(generate(model, p, image_features=feats[i : i + 1], **kw)) for i, p in enumerate(prompts)]
    assert _rows(list(generate_batch(model, prompts, image_features=feats, **kw))) == alone


def test_batched_bfloat16_logits_agree_with_alone(loaded):
    """bf16 rounds differently for other batch shapes, so logits are compared with a tolerance, and first tokens
    only where the unbatched top-2 margin is wider than that tolerance."""
    path, _ = loaded
    model = load_model(path, dtype=torch.bfloat16).model
    prompts, pv = _batch(model.cfg)
    feats = encode_image(model, pv)
    cache = lambda rows, length: KVCache(model.cfg.text, rows, length, model.dtype, "cpu")
    alone = torch.cat(
        [prefill(model, p, torch.zeros_like(p), feats[i : i + 1], cache(1, p.shape[1])) for i, p in enumerate(prompts)]
    ).float()
    width = max(p.shape[1] for p in prompts)
    ids, types, valid, positions, _ = left_pad(prompts, None, width, model.cfg.pad_token_id, model.device)
    batched = prefill(model, ids, types, feats, cache(len(prompts), width), valid, positions).float()
    tolerance = 0.05 * float(alone.abs().max())  # measured: under 0.015 of the largest logit
    torch.testing.assert_close(batched, alone, atol=tolerance, rtol=0)
    top2 = alone.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    assert torch.equal(batched.argmax(-1)[clear], alone.argmax(-1)[clear])


def test_left_pad_masks_pads_and_counts_positions_per_row():
    short, long = torch.tensor([[7, 8]]), torch.tensor([[4, 5, 6, 9]])
    ids, types, valid, positions, width = left_pad([short, long], [torch.tensor([[0, 1]]), None], 6, 0, "cpu")
    assert width == 4
    assert ids.tolist() == [[0, 0, 7, 8, 0, 0], [4, 5, 6, 9, 0, 0]]
    assert valid.tolist() == [[False, False, True, True, True, True], [True] * 6]
    assert positions.tolist() == [[1, 1, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]  # 1-indexed, real tokens only
    assert types.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]


def test_generate_batch_validates_arguments(loaded):
    _, model = loaded
    prompts, pv = _batch(model.cfg)
    with pytest.raises(ValueError, match="at least one"):
        next(generate_batch(model, [], pixel_values=pv))
    with pytest.raises(ValueError, match="shape"):
        next(generate_batch(model, [prompts[0].repeat(2, 1)], pixel_values=pv[:1]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(generate_batch(model, prompts, pixel_values=pv, max_new_tokens=0))


@pytest.mark.parametrize("which", ["pg1", "pg2"])
def test_decode_rows_equal_each_request_alone(which, tiny_pg1_dir, tiny_pg2_dir):
    """Requests of different lengths joining at different steps, decoded together with caches of their own (the
    server's continuous batching): every request's tokens are its tokens alone, bit for bit in float32. pg2's
    sliding window (8) is shorter than the prompts, so the per-row windows are exercised."""
    from lowmem_paligemma.model.gemma import KVCache
    from lowmem_paligemma.model.generate import decode_rows, prefill
    from lowmem_paligemma.model.processor import Processor

    model_dir = tiny_pg2_dir if which == "pg2" else tiny_pg1_dir
    model = load_model(model_dir, dtype=torch.float32).model
    proc = Processor.from_pretrained(model_dir)
    prompts = ["caption en", "answer en what is this long question about the picture?", "ocr"]
    g = torch.Generator().manual_seed(3)
    pixels = [torch.rand(1, 3, 28, 28, generator=g) * 2 - 1 for _ in prompts]
    n = 12
    alone = []
    for p, px in zip(prompts, pixels):
        ids, types = proc.prompt_inputs(p)
        alone.append(list(generate(model, ids, types, pixel_values=px, max_new_tokens=n, eos_token_ids=[])))
    # Request i joins after i steps of the others, as a server admits between steps.
    caches, slots, tokens, out = [], [], [], [[] for _ in prompts]
    for step in range(n + len(prompts)):
        if step < len(prompts):
            ids, types = proc.prompt_inputs(prompts[step])
            cache = KVCache(model.cfg.text, 1, ids.shape[1] + n, torch.float32, "cpu")
            logits = prefill(model, ids, types, model.encode_image(pixels[step]), cache)
            first = int(logits.argmax(-1))
            caches.append(cache), slots.append(ids.shape[1]), tokens.append(first), out[step].append(first)
        active = [i for i in range(len(caches)) if len(out[i]) < n]
        if not active:
            break
        logits = decode_rows(
            model, [tokens[i] for i in active], [caches[i] for i in active], [slots[i] for i in active]
        )
        for row, i in enumerate(active):
            tokens[i] = int(logits[row].argmax())
            out[i].append(tokens[i])
            slots[i] += 1
    assert out == alone and len({tuple(a) for a in alone}) == len(prompts)
