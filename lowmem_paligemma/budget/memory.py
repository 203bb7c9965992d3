"""What a request needs beside the weights, in bytes: the KV cache and the largest activations.

`request_bytes` is the one estimate of a request: the caller makes it once (runtime/session.py) and hands it to
the load pre-flight (checkpoint/preflight.py, which adds it to the weights, so a request that cannot fit is
refused before the model is allocated), to the residency plan under a memory budget (residency.py) and to the
server's admission of a request (runtime/server). The estimates follow the code, not a rule of
thumb; each term names the tensor it counts. They are upper bounds where the kernel decides (SDPA may or may
not materialise its scores). An 896-pixel image is 4,096 image tokens, so its prefill is quadratic in them.

Axes: B batch, L prompt length (image tokens included), T total length (prompt + new tokens), N heads,
K kv heads, H head dim, D width, I MLP width, V vocab, P image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import defaults
from ..model.config import GemmaConfig, PaliGemmaConfig

FLOAT32 = 4  # bytes: softmax and sampling run in float32


def kv_cache_bytes(text: GemmaConfig, total_len: int, dtype: torch.dtype, batch: int = 1) -> int:
    """gemma.KVCache: keys and values, each (layers, B, K, T, H) in the model dtype."""
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * total_len * text.head_dim * dtype.itemsize


def prefill_bytes(cfg: PaliGemmaConfig, prompt_len: int, dtype: torch.dtype, batch: int = 1) -> int:
    """The largest temporaries alive at once while the language model reads the prompt, counted generously:
    the budget planner (residency.py) must not undershoot."""
    t, L, item = cfg.text, prompt_len, dtype.itemsize
    n, k, h = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    # Attention scores (B, N, C, L) for C = min(L, ATTENTION_QUERY_CHUNK) queries at a time (gemma._attend): a
    # float32 softmax and two model-dtype copies on the soft-capped eager path (Gemma 2), and one head's float32
    # product where those products run in float32 (gemma._float32_matmul); SDPA's math fallback (Gemma 1) is smaller.
    c = min(L, defaults.ATTENTION_QUERY_CHUNK)
    scores = n * c * L * (FLOAT32 + 2 * item) + c * L * FLOAT32
    # paligemma.make_attn_mask: (B, 1, L, L) in the model dtype with its boolean temporaries, one per mask kind.
    masks = (2 if t.sliding_window else 1) * L * L * (item + 3)
    # gate and up, (B, L, I) each (gemma.GemmaMLP takes the gelu and the product in place), and one more (B, L, I)
    # of margin: this estimate errs high on purpose (docstring).
    mlp = 3 * L * t.intermediate_size * item
    qkv = 2 * L * (n + 2 * k) * h * item + 2 * n * L * h * item  # q, k, v, their rotated copies, the GQA expansion
    norms = 4 * L * t.hidden_size * FLOAT32  # float32 copies of the residual stream in the norms
    logits = 2 * t.vocab_size * FLOAT32  # the last position's row and its float32 copy for sampling
    return batch * (scores + masks + mlp + qkv + norms + logits + widened(L, t.hidden_size, t.intermediate_size))


def widened(rows: int, width: int, inner: int) -> int:
    """A prefill kernel that widens 16-bit weights to float32 (formats/dense.py "upcast") also holds its
    activations in float32: the MLP layer's input and output, (rows, D) and (rows, I). Its weight buffer is the
    model's, not the request's (formats/base.Scratch, counted by the load as kernel buffers)."""
    return rows * (width + inner) * FLOAT32


def vision_bytes(cfg: PaliGemmaConfig, dtype: torch.dtype, batch: int = 1) -> int:
    """The largest temporaries of the vision tower (runs before the KV cache exists)."""
    v, P, item = cfg.vision, cfg.num_image_tokens, dtype.itemsize
    chunk = min(P, defaults.ATTENTION_QUERY_CHUNK)  # queries at a time (siglip.SiglipAttention)
    scores = v.num_attention_heads * chunk * P * (FLOAT32 + 2 * item)  # (B, heads, C, P), as the text scores
    mlp = 3 * P * v.intermediate_size * item  # fc1's output (its gelu in place) and two more (B, P, I) of margin
    return batch * (scores + mlp + 8 * P * v.hidden_size * FLOAT32 + widened(P, v.hidden_size, v.intermediate_size))


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
