"""Next-token choice from logits: small pure functions with an explicit `torch.Generator`.

Temperature 0 means greedy (big_vision's and HF's default for PaliGemma, docs/model.md, "Generation and stopping").
Otherwise the order is temperature -> top-k -> top-p -> `torch.multinomial`, the order of HF's default warpers.
All math is float32 whatever the logits' dtype: bf16 softmax tails are too coarse to sample from. Filters return
float32 logits with removed tokens set to -inf. Ties are broken towards the lower token id everywhere (a stable sort),
so the same logits always give the same kept set.

Axis legend: B: batch, V: vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import defaults
from ..errors import OptionError
from ..formats import native

# A head whose mass equals p in exact arithmetic (0.5 + 0.3 = 0.8) can land a few ulps short of p after a
# float32 softmax; mass within this tolerance of p counts as reaching it, so no extra token slips in.
_TOP_P_TOLERANCE = 1e-6


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) int64: the first maximal index, i.e. the lower id on ties (a NaN counts as maximal), in the
    logits' own dtype (widening is exact, so the choice is the float32 one). On the CPU by native_decode.cpp's
    argmax where it built: torch's ran one row at ~1 G values/s, up to 1 ms a step over 257,216 logits."""
    nk = native.kernels() if logits.device.type == "cpu" and logits.dim() == 2 else None
    if nk is not None and logits.dtype in (torch.bfloat16, torch.float16, torch.float32) and logits.shape[-1] > 0:
        return nk.argmax_rows(logits.contiguous())
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, V) logits / temperature in float32; temperature must be > 0 (0 is greedy, handled by the caller)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0 here, got {temperature}")
    return logits.float() / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (ties to the lower id), -inf elsewhere; k > V keeps all."""
    _check_top_k(k)
    logits = logits.float()
    if k >= logits.shape[-1]:
        return logits
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # (B, V)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return logits.masked_fill(~keep, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: per row keep the smallest set of most probable tokens whose total probability >= p.

    The top token is always kept; among equal probabilities the lower id comes first, so at most one tied
    token is cut at the boundary, always the same one. p = 1 keeps every token.
    """
    _check_top_p(p)
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # (B, V) float32
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    # Mass strictly before each sorted token, summed in float64 so a 257k-token tail adds no drift.
    before = torch.cumsum(sorted_probs.double(), dim=-1) - sorted_probs.double()
    keep_sorted = before < p - _TOP_P_TOLERANCE  # token i is needed while the mass before it falls short of p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, -math.inf)


def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) int64 token ids. temperature 0 is greedy and ignores top_k / top_p."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [B, V], got {list(logits.shape)}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        _check_top_k(top_k)
    if top_p is not None:
        _check_top_p(top_p)
    if temperature == 0:
        return greedy(logits)
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V) float32; filtered tokens have probability 0
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_top_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {k!r}")


def _check_top_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick a request's tokens, validated when made (OptionError naming the field), so every front end
    shares the checks: the CLI's options and the server's JSON fields arrive here."""

    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OptionError(f"max_new_tokens must be an integer >= 1, got {n!r}", "max_new_tokens")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t >= 0):
            raise OptionError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}", "temperature")
        for name, check in (("top_k", _check_top_k), ("top_p", _check_top_p)):
            if getattr(self, name) is not None:
                try:
                    check(getattr(self, name))
                except ValueError as e:
                    raise OptionError(str(e), name) from None
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not -(2**63) <= s < 2**64):
            raise OptionError(
                f"seed must be an integer in [-2**63, 2**64) (torch's generator seeds), got {s!r}", "seed"
            )
