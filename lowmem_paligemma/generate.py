"""Generation: encode the image once, prefill with the prefix-LM mask, then one cached decode step per token.

- The KV cache (gemma.KVCache) is allocated per request for prompt + max_new_tokens and written in place;
  sliding-window layers share the full-length cache and see the window through the mask.
- `generate()` is a generator of token ids; the caller decides when to stop reading. Grad mode is set
  around each model call, not across a `yield`, so the caller's code never runs in inference mode.
- Several prompts on one image: `encode_image` once, pass the features to each `generate()` call.
  (The language-model prefill is redone: image tokens attend to the prompt, so their keys depend on it.)

Axes: B batch (1 here), L prompt length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .config import GemmaConfig
from .errors import ContextLengthError
from .gemma import KVCache
from .paligemma import PaliGemmaForConditionalGeneration
from .sampling import sample_next_token


@torch.inference_mode()
def encode_image(model: PaliGemmaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, N, D) image features, reusable across prompts."""
    return model.encode_image(pixel_values.to(model.device))


@torch.inference_mode()
def prefill(
    model: PaliGemmaForConditionalGeneration,
    ids: torch.Tensor,
    token_types: torch.Tensor,
    image_features: torch.Tensor | None,
    cache: KVCache,
) -> torch.Tensor:
    """Run the whole prompt (B, L), fill the cache, return the next-token logits (B, V)."""
    return model(ids, token_type_ids=token_types, image_features=image_features, cache=cache, last_only=True)[:, -1]


@torch.inference_mode()
def decode_step(
    model: PaliGemmaForConditionalGeneration, ids: torch.Tensor, token_types: torch.Tensor, pos: int, cache: KVCache
) -> torch.Tensor:
    """Feed the token at `pos` (ids/token_types cover 0..pos), return the next-token logits (B, V)."""
    return model(ids[:, : pos + 1], token_type_ids=token_types[:, : pos + 1], cache=cache, start=pos)[:, -1]


def check_length(cfg: GemmaConfig, prompt_tokens: int, max_new_tokens: int) -> int:
    """Positions the request uses (prompt + new tokens), or a ContextLengthError if over the model's context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total, context = prompt_tokens + max_new_tokens, cfg.max_position_embeddings
    if total > context:
        room = context - prompt_tokens
        advice = f"ask for at most {room} new tokens" if room > 0 else "the prompt alone fills it"
        raise ContextLengthError(
            f"a prompt of {prompt_tokens} tokens (image included) + max_new_tokens {max_new_tokens} = {total} "
            f"positions is over the model's context of {context} (text_config.max_position_embeddings); {advice}"
        )
    return total


def generate(
    model: PaliGemmaForConditionalGeneration,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> Iterator[int]:
    """Yield generated token ids for one prompt (1, L); stops after an EOS id (yielded) or max_new_tokens.

    The request is checked here, before anything is allocated: a prompt + max_new_tokens over the model's
    context raises ContextLengthError at the call, not at the first token.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate() takes one prompt of shape (1, L), got {tuple(input_ids.shape)}")
    check_length(model.cfg.text, input_ids.shape[1], max_new_tokens)
    eos = set(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    sample = lambda logits: int(sample_next_token(logits.float().cpu(), generator, temperature, top_k, top_p)[0])
    return _tokens(model, input_ids, token_type_ids, pixel_values, image_features, max_new_tokens, eos, sample)


def _tokens(
    model: PaliGemmaForConditionalGeneration,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    image_features: torch.Tensor | None,
    max_new_tokens: int,
    eos: set[int],
    sample: Callable[[torch.Tensor], int],
) -> Iterator[int]:
    device = model.device
    length = input_ids.shape[1]
    total = length + max_new_tokens
    ids = torch.zeros(1, total, dtype=torch.long, device=device)
    ids[:, :length] = input_ids
    token_types = torch.ones(1, total, dtype=torch.long, device=device)  # generated tokens: causal (type 1)
    token_types[:, :length] = 0 if token_type_ids is None else token_type_ids
    if image_features is None and pixel_values is not None:
        image_features = encode_image(model, pixel_values)
    cache = KVCache(model.cfg.text, 1, total, model.dtype, device)

    logits = prefill(model, ids[:, :length], token_types[:, :length], image_features, cache)
    for i in range(max_new_tokens):
        token = sample(logits)
        yield token
        if token in eos or i == max_new_tokens - 1:
            return
        pos = length + i
        ids[0, pos] = token
        logits = decode_step(model, ids, token_types, pos, cache)
