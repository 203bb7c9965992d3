"""What a request needs beyond the weights, in bytes: the KV cache and the largest activations.

The load pre-flight adds these to the weights (runtime.load_session -> loader.check_memory), so a request
that cannot fit is refused before the model is allocated. The estimates follow the code, not a rule of
thumb; each term names the tensor it counts. They are upper bounds where the kernel decides (SDPA may or may
not materialise its scores). An 896-pixel image is 4,096 image tokens, so its prefill is quadratic in them.

Axes: B batch, L prompt length (image tokens included), T total length (prompt + new tokens), N heads,
K kv heads, H head dim, D width, I MLP width, V vocab, P image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GemmaConfig, PaliGemmaConfig

FLOAT32 = 4  # bytes: softmax and sampling run in float32


def kv_cache_bytes(text: GemmaConfig, total_len: int, dtype: torch.dtype, batch: int = 1) -> int:
    """gemma.KVCache: keys and values, each (layers, B, K, T, H) in the model dtype."""
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * total_len * text.head_dim * dtype.itemsize


def prefill_bytes(cfg: PaliGemmaConfig, prompt_len: int, dtype: torch.dtype, batch: int = 1) -> int:
    """The largest temporaries alive at once while the language model reads the prompt."""
    t, L, item = cfg.text, prompt_len, dtype.itemsize
    # paligemma.make_attn_mask: (B, 1, L, L) in the model dtype, one per mask kind, alive through every layer.
    masks = (2 if t.sliding_window else 1) * batch * L * L * item
    # Attention scores (B, N, L, L): the soft-capped eager path (Gemma 2) keeps a float32 softmax and a
    # model-dtype copy; SDPA (Gemma 1) at most one model-dtype copy on its math path.
    scores = batch * t.num_attention_heads * L * L * (FLOAT32 + item if t.attn_logit_softcap else item)
    mlp = 3 * batch * L * t.intermediate_size * item  # gate, up and gelu(gate) * up: (B, L, I) each
    hidden = 4 * batch * L * max(t.hidden_size, t.num_attention_heads * t.head_dim) * item  # residual, norm, q, out
    logits = batch * t.vocab_size * (item + FLOAT32)  # the last position's row, then its float32 copy for sampling
    return masks + max(scores, mlp) + hidden + logits


def vision_bytes(cfg: PaliGemmaConfig, dtype: torch.dtype, batch: int = 1) -> int:
    """The largest temporaries of the vision tower (runs before the KV cache exists)."""
    v, P, item = cfg.vision, cfg.num_image_tokens, dtype.itemsize
    scores = batch * v.num_attention_heads * P * P * item  # (B, heads, P, P) if SDPA takes its math path
    mlp = 2 * batch * P * v.intermediate_size * item  # fc1 and its gelu: (B, P, I)
    return max(scores, mlp) + 4 * batch * P * v.hidden_size * item


@dataclass(frozen=True)
class RequestMemory:
    """Bytes one request needs on top of the weights."""

    positions: int  # prompt + new tokens
    kv_cache: int
    prefill: int  # while the prompt is read, beside the KV cache
    vision: int  # while the image is encoded, before the KV cache is allocated

    @property
    def total(self) -> int:
        return max(self.kv_cache + self.prefill, self.vision)

    def parts(self) -> dict[str, int]:
        """Named parts for the pre-flight's message; they add up to `total`."""
        return {f"KV cache for {self.positions:,} positions": self.kv_cache, "activations": self.total - self.kv_cache}


def request_bytes(
    cfg: PaliGemmaConfig, prompt_len: int, max_new_tokens: int, dtype: torch.dtype, batch: int = 1
) -> RequestMemory:
    total_len = prompt_len + max_new_tokens
    return RequestMemory(
        positions=total_len,
        kv_cache=kv_cache_bytes(cfg.text, total_len, dtype, batch),
        prefill=prefill_bytes(cfg, prompt_len, dtype, batch),
        vision=vision_bytes(cfg, dtype, batch),
    )
