"""Generation: encode the image once, prefill with the prefix-LM mask, then one cached decode step per token.

- The KV cache (gemma.KVCache) is allocated per request for prompt + max_new_tokens and written in place;
  sliding-window layers share the full-length cache and see the window through the mask.
- `generate()` is a generator of token ids; the caller decides when to stop reading. Grad mode is set
  around each model call, not across a `yield`, so the caller's code never runs in inference mode.
- Several prompts on one image: `encode_image` once, pass the features to each `generate()` call.
  (The language-model prefill is redone: image tokens attend to the prompt, so their keys depend on it.)
- Several (image, prompt) pairs at once: `generate_batch()`. On a CPU a decode step reads every weight
  once whatever the batch, so B rows cost about one. Prompts of different lengths are left-padded: the
  attention mask drops the pads in every layer and positions count real tokens only (transformers:
  cumsum(attention_mask), 1-indexed), so each row's greedy tokens are the ones it gets alone.

Axes: B batch, L prompt length (the longest, in a batch), V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .. import defaults
from ..errors import ContextLengthError
from .config import GemmaConfig
from .gemma import KVCache, RowCaches
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
    valid: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the whole prompt (B, L), fill the cache, return the next-token logits (B, V).

    Left-padded rows pass `valid` (B, L), False on pads, and their `positions` (B, L). The tensors may be on the
    CPU (a processor's output) with the model on a GPU: they go where the model is.
    """
    ids, token_types, valid, positions = (None if t is None else t.to(model.device)
                                          for t in (ids, token_types, valid, positions))  # fmt: skip
    return model(
        ids, token_type_ids=token_types, attention_mask=valid, image_features=image_features, cache=cache,
        last_only=True, positions=positions,
    )[:, -1]  # fmt: skip


@torch.inference_mode()
def decode_step(
    model: PaliGemmaForConditionalGeneration,
    ids: torch.Tensor,
    token_types: torch.Tensor,
    pos: int,
    cache: KVCache,
    valid: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed the token at `pos` (ids/token_types, and `valid`/`positions` if given, cover 0..pos at least),
    return the next-token logits (B, V)."""
    return model(
        ids[:, : pos + 1], token_type_ids=token_types[:, : pos + 1],
        attention_mask=None if valid is None else valid[:, : pos + 1], cache=cache, start=pos,
        positions=None if positions is None else positions[:, pos : pos + 1],
    )[:, -1]  # fmt: skip


@torch.inference_mode()
def decode_rows(
    model: PaliGemmaForConditionalGeneration, tokens: Sequence[int], caches: Sequence[KVCache], slots: Sequence[int]
) -> torch.Tensor:
    """One decode step of several requests at once, each with its own cache: row i feeds `tokens[i]` at slot
    `slots[i]` of `caches[i]` (its prompt and earlier tokens fill the slots before), returns the next-token logits
    (B, V). Row i's logits are those of `decode_step` on that request alone (gemma.RowCaches)."""
    device = model.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
    positions = torch.tensor(slots, dtype=torch.long, device=device)[:, None] + 1  # 1-indexed, as decode_step's
    rows = RowCaches(list(caches), list(slots), model.cfg.text.sliding_window, model.dtype)
    return model(ids, cache=rows, positions=positions)[:, -1]


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
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
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
    # In the logits' dtype: greedy's choice is the same in any (sampling.py widens to float32 where it samples).
    sample = lambda logits: int(sample_next_token(logits.cpu(), generator, temperature, top_k, top_p)[0])
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


def left_pad(
    input_ids: Sequence[torch.Tensor],
    token_type_ids: Sequence[torch.Tensor | None] | None,
    total: int,
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """ids, token types, valid, positions, each (B, total), and the padded prompt width L.

    Row i holds its prompt in slots L - L_i .. L - 1 and generates from slot L on. valid is False on pads,
    so no real query sees them; pads are token type 0, so a pad's own query still sees its row's prefix
    block and no query row is all masked (its values stay finite, and its keys are never read).
    """
    width = max(x.shape[1] for x in input_ids)
    rows = len(input_ids)
    ids = torch.full((rows, total), pad_id, dtype=torch.long)
    token_types = torch.ones(rows, total, dtype=torch.long)  # generated tokens: causal (type 1)
    token_types[:, :width] = 0
    valid = torch.ones(rows, total, dtype=torch.bool)
    for i, row in enumerate(input_ids):
        pad = width - row.shape[1]
        ids[i, pad:width] = row[0]
        if token_type_ids is not None and token_type_ids[i] is not None:
            token_types[i, pad:width] = token_type_ids[i][0]
        valid[i, :pad] = False
    positions = valid.long().cumsum(-1).clamp(min=1)  # 1-indexed per row, counting real tokens only
    return ids.to(device), token_types.to(device), valid.to(device), positions.to(device), width


def _sample_rows(
    logits: torch.Tensor,
    generators: list[torch.Generator | None],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> list[int]:
    """(B, V) -> B token ids; sampled row by row with each row's own generator, as if it ran alone."""
    if temperature == 0:
        return sample_next_token(logits).tolist()
    return [
        int(sample_next_token(logits[i : i + 1], g, temperature, top_k, top_p)[0]) for i, g in enumerate(generators)
    ]


def generate_batch(
    model: PaliGemmaForConditionalGeneration,
    input_ids: Sequence[torch.Tensor],
    token_type_ids: Sequence[torch.Tensor | None] | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> Iterator[list[int | None]]:
    """Generate for B prompts (each (1, L_i)) together; yield one list of B entries per step.

    Entry i is row i's next token, or None once row i has stopped (its EOS is yielded, then None).
    Ends when every row has stopped or after max_new_tokens steps. `pixel_values` (B, 3, S, S) or
    `image_features` (B, N, D) are in row order. Row i's tokens are those of `generate()` on its prompt
    alone: greedy up to float rounding across batch shapes (exact in float32 in tests/model/test_generate.py),
    and sampled with a seed, each row draws from its own generator seeded `seed`.
    """
    rows = len(input_ids)
    if rows == 0:
        raise ValueError("generate_batch() needs at least one prompt")
    for x in input_ids:
        if x.dim() != 2 or x.shape[0] != 1:
            raise ValueError(f"generate_batch() takes prompts of shape (1, L), got {tuple(x.shape)}")
    if token_type_ids is not None and len(token_type_ids) != rows:
        raise ValueError(f"{rows} prompts but {len(token_type_ids)} token type rows")
    check_length(model.cfg.text, max(x.shape[1] for x in input_ids), max_new_tokens)  # before the cache exists
    eos = set(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    device = model.device
    total = max(x.shape[1] for x in input_ids) + max_new_tokens
    padded = left_pad(input_ids, token_type_ids, total, model.cfg.pad_token_id, device)
    ids, token_types, valid, positions, width = padded
    if image_features is None and pixel_values is not None:
        image_features = encode_image(model, pixel_values)
    generators = [None if seed is None else torch.Generator().manual_seed(seed) for _ in range(rows)]
    cache = KVCache(model.cfg.text, rows, total, model.dtype, device)

    logits = prefill(model, ids[:, :width], token_types[:, :width], image_features, cache, valid[:, :width],
                     positions[:, :width])  # fmt: skip
    stopped = [False] * rows
    for i in range(max_new_tokens):
        tokens = _sample_rows(logits.cpu(), generators, temperature, top_k, top_p)
        step = [None if done else token for done, token in zip(stopped, tokens)]
        stopped = [done or token in eos for done, token in zip(stopped, tokens)]
        yield step
        if all(stopped) or i == max_new_tokens - 1:
            return
        pos = width + i
        # A stopped row is fed padding; its logits are never read again.
        ids[:, pos] = torch.tensor([model.cfg.pad_token_id if t is None else t for t in step], device=device)
        logits = decode_step(model, ids, token_types, pos, cache, valid, positions)
