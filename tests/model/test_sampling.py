import math

import pytest
import torch

from lowmem_paligemma.model.sampling import (
    apply_temperature,
    greedy,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in filtered]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [9.0, -1.0, 0.0, 8.0, 7.0]])
    out = top_k_filter(logits, 2)
    assert kept(out) == [{1, 3}, {0, 3}]
    # Kept values are untouched, removed ones are -inf.
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0 and out[0, 0] == -math.inf
    assert kept(top_k_filter(logits, 1)) == [{1}, {0}]
    assert kept(top_k_filter(logits, 99)) == [set(range(5))] * 2


def test_top_k_ties_break_to_lower_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert kept(top_k_filter(logits, 2)) == [{1, 2}]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # shuffled so the sort matters: order is ids 1, 3, 0, 2
    logits = probs.log().unsqueeze(0)
    assert kept(top_p_filter(logits, 0.8)) == [{1, 3}]  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept(top_p_filter(logits, 0.81)) == [{1, 3, 0}]
    assert kept(top_p_filter(logits, 0.5)) == [{1}]
    assert kept(top_p_filter(logits, 0.51)) == [{1, 3}]
    assert kept(top_p_filter(logits, 0.96)) == [{0, 1, 2, 3}]
    assert kept(top_p_filter(logits, 1.0)) == [{0, 1, 2, 3}]
    assert kept(top_p_filter(logits, 1e-9)) == [{1}]  # the top token always survives


def test_top_p_boundary_survives_float32_rounding():
    # After a float32 softmax 0.7 + 0.2 sums to 0.89999998 < 0.9; the head still reaches p = 0.9.
    logits = torch.tensor([[0.7, 0.2, 0.1]]).log()
    assert kept(top_p_filter(logits, 0.9)) == [{0, 1}]
    assert kept(top_p_filter(logits, 0.9001)) == [{0, 1, 2}]


def test_top_p_rows_and_ties():
    logits = torch.stack([torch.zeros(4), torch.tensor([0.5, 0.3, 0.15, 0.05]).log()])
    # Four equal probabilities: the lower ids come first, exactly two reach 0.5.
    assert kept(top_p_filter(logits, 0.5)) == [{0, 1}, {0}]


def test_top_p_on_bf16_logits():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().bfloat16()
    out = top_p_filter(logits, 0.9)
    assert out.dtype == torch.float32
    assert kept(out) == [{0, 1, 2}]


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(-1)
    assert torch.equal(greedy(logits), expected)
    assert torch.equal(sample_next_token(logits), expected)
    gen = torch.Generator().manual_seed(1)
    out = sample_next_token(logits, gen, temperature=0.0, top_k=5, top_p=0.5)
    assert out.dtype == torch.int64 and out.shape == (4,)
    assert torch.equal(out, expected)
    assert torch.equal(sample_next_token(logits.bfloat16()), logits.bfloat16().argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 257216])
def test_greedy_is_torchs_argmax_on_ties_nans_and_infinities(dtype, n):
    """The native argmax (native_decode.cpp) against torch.argmax: the first maximal index, a NaN counting as maximal,
    in each dtype, with the maximum in a vector or in the tail."""
    g = torch.Generator().manual_seed(n)
    rows = (torch.randn(8, n, generator=g) * 100).to(dtype)
    rows[1] = rows[1].round()  # many ties below the top
    rows[2, n // 2 :] = rows[2].max() + 1  # the maximum n - n // 2 times: the first one wins
    rows[3] = -math.inf
    rows[4, -1] = math.inf  # the maximum in the last lane (the tail where n % 16)
    rows[5, n // 3] = math.nan
    rows[5, -1] = math.nan  # two NaNs: the first wins, whatever is larger
    rows[6] = 0.0
    rows[6, -1] = -0.0  # equal zeros: the first
    rows[7, 0] = rows[7].max() + 1  # the maximum at index 0
    assert torch.equal(greedy(rows), rows.argmax(-1))
    assert torch.equal(greedy(rows[2:3]), rows[2:3].argmax(-1))


def test_same_seed_same_samples_different_seed_different():
    logits = torch.zeros(16, 1000)  # uniform: 16 draws from 1000 tokens

    def draw(seed: int) -> torch.Tensor:
        return sample_next_token(logits, torch.Generator().manual_seed(seed), temperature=1.0)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (16,) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # equal with probability 1e-48


def test_samples_stay_inside_the_filters():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, gen, temperature=1.0, top_k=2).tolist()) == {1, 3}
    assert set(sample_next_token(logits, gen, temperature=1.0, top_p=0.81).tolist()) == {0, 1, 3}
    assert set(sample_next_token(logits, gen, temperature=1.0).tolist()) == {0, 1, 2, 3}


def test_sample_frequencies_follow_temperature():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20000, 3)
    gen = torch.Generator().manual_seed(0)
    for t in (1.0, 2.0):
        freq = torch.bincount(sample_next_token(logits, gen, temperature=t), minlength=3).float() / 20000
        expected = torch.softmax(probs.log() / t, -1)
        torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_apply_temperature():
    logits = torch.tensor([[2.0, 4.0]], dtype=torch.bfloat16)
    out = apply_temperature(logits, 2.0)
    assert out.dtype == torch.float32
    assert out.tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.5},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 1.0, "top_k": 0},
        {"temperature": 1.0, "top_k": -3},
        {"temperature": 1.0, "top_k": 2.5},
        {"temperature": 1.0, "top_k": True},
        {"temperature": 1.0, "top_p": 0.0},
        {"temperature": 1.0, "top_p": 1.5},
        {"temperature": 1.0, "top_p": -0.1},
        {"temperature": 1.0, "top_p": float("nan")},
        {"temperature": 0.0, "top_k": 0},  # validated even when greedy ignores it
    ],
)
def test_invalid_args_raise(kwargs):
    with pytest.raises(ValueError) as e:
        sample_next_token(torch.zeros(2, 8), torch.Generator().manual_seed(0), **kwargs)
    assert "\n" not in str(e.value)


def test_invalid_filter_args_and_shapes_raise():
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(torch.zeros(1, 4), 0.0)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(torch.zeros(1, 4), 0)
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(1, 4), 0.0)
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample_next_token(torch.zeros(8))
