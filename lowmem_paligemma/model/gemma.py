"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoder: one code path, Gemma 2 by config flags.

What is special (each checked bit-for-bit against transformers' eager path, docs/model.md, "Forward pass"):
- RMSNorm computes in float32 and scales by (1 + w): "Gemma is (x * w).to(dtype)" (gemma_pytorch).
- RoPE is half-split (rotate_half), tables computed on the fly from positions: no buffers to go stale
  after `to_empty` (docs/model.md, "Forward pass": a port that kept `inv_freq` as a buffer gave a different
  answer on every run).
- Gemma 2 flags: post-norms around both sub-blocks, tanh soft-cap on attention scores before the mask,
  attention scale query_pre_attn_scalar**-0.5, sliding window on `sliding_layers` (the mask says which).
- The KV cache is preallocated per request and written in place at `start` (never grown by cat).

Axes: B batch, T query length, S key length, D hidden, N query heads, K kv heads, H head dim, I mlp width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import defaults
from ..formats import native
from ..formats.dense import Embedding, Linear
from .config import GemmaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as an offset from 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (nk := _native_decode(x)) is not None:  # one call, not ten ops (native_decode.cpp)
            return nk.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin of shape (B, 1, T, H) for integer positions (B, T); same float32 arithmetic as transformers."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (H/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, H/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, H)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if (nk := _native_decode(x)) is not None:  # (B, N, 1, H): the same three roundings in one call
        return nk.rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half: halves, not interleaved pairs
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for one request: (layers, B, K, max_len, H), written in place."""

    def __init__(self, cfg: GemmaConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, K, S, H) views


class RowCaches:
    """Several requests decoded together, each with its own KVCache (one row) and its own length: the linear layers
    take all rows at once (the weights are read once per step), attention reads each row against its own cache,
    so no request waits for, pads to or copies another's. Row i writes its new key and value at `slots[i]` and
    attends to keys 0..slots[i] (on sliding layers the last `window` of them): what a decode step of that request
    alone sees, to the bit."""

    def __init__(self, caches: list[KVCache], slots: list[int], window: int | None, dtype: torch.dtype):
        self.caches, self.slots = caches, slots
        device = caches[0].k.device  # the model's: each row's mask meets its scores there
        self.masks = [(_decode_mask(p, None, dtype, device), _decode_mask(p, window, dtype, device)) for p in slots]

    def update(self, row: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.caches[row].update(layer, self.slots[row], k, v)  # (1, K, S_row, H) views


def _decode_mask(slot: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, 1, slot + 1) mask of a generated token at `slot` (token type 1: causal): exactly what
    paligemma.make_attn_mask gives that query (0, or the dtype's min before the window), so SDPA takes the same path."""
    mask = torch.zeros(1, 1, 1, slot + 1, dtype=dtype, device=device)
    if window is not None:
        mask.masked_fill_(torch.arange(slot + 1, device=device) <= slot - window, torch.finfo(dtype).min)
    return mask


class GemmaAttention(nn.Module):
    # Gemma 2's prefill score and value products in float32 (`_float32_matmul`) instead of torch's 16-bit bmm:
    # set by formats.kernels.use_kernels where the dense prefill widens to float32 (the chooser measured 16-bit GEMMs
    # slower there). On the AVX2 CPU torch's bf16 bmm ran these shapes at ~2.4 GFLOP/s: 5.7 s of PaliGemma 2's
    # 15 s prefill (torch.profiler, by hand).
    float32_products: bool = False

    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding = cfg.is_sliding(layer_idx)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcap
        d, n, k = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = Linear(d, n, bias=False)
        self.k_proj = Linear(d, k, bias=False)
        self.v_proj = Linear(d, k, bias=False)
        self.o_proj = Linear(n, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | RowCaches | None,
        start: int,
        last_only: bool = False,
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with `last_only`, keys and values of all T tokens (the cache needs them) but
        the output of the last query only: (B, 1, D). With RowCaches (T = 1) each row attends to its own cache."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, H)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, *rope)
        if last_only and t > 1:
            x, rope = x[:, -1:], (rope[0][:, :, -1:], rope[1][:, :, -1:])
            mask = None if mask is None else mask[:, :, -1:]
            t = 1
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, T, H)
        q = apply_rope(q, *rope)
        if isinstance(cache, RowCaches):
            outs = []
            for i in range(b):
                kv = cache.update(i, self.layer_idx, k[i : i + 1], v[i : i + 1])
                outs.append(self._attend(q[i : i + 1], *kv, cache.masks[i][1 if self.sliding else 0]))
            return self.o_proj(torch.cat(outs))
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)  # (B, K, S, H)
        return self.o_proj(self._attend(q, k, v, mask))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, N, T, H) against k, v (B, K, S, H) with an additive mask (B, 1, T, S) -> (B, T, N*H); a long prompt's
        queries ATTENTION_QUERY_CHUNK at a time (each query row's arithmetic is the same: only the scores held at once
        shrink, heads x chunk x S instead of heads x T x S)."""
        t, chunk = q.shape[2], defaults.ATTENTION_QUERY_CHUNK
        if t <= chunk:
            return self._attend_block(q, k, v, mask)
        blocks = []
        for i in range(0, t, chunk):
            rows = None if mask is None else mask[:, :, i : i + chunk]
            blocks.append(self._attend_block(q[:, :, i : i + chunk], k, v, rows))
        return torch.cat(blocks, 1)

    def _attend_block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t = q.shape[0], q.shape[2]
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and t == 1:
            # One query per head: the G heads that share a kv head become G query rows of it, (B, K, G, H)
            # against (B, K, S, H), instead of a copy of the cache per head, which made a batch-8 decode step cost
            # far more than a batch-1 step (docs/performance.md, "Batches and Ray"). The mask (B, 1, 1, S) broadcasts.
            q = q.reshape(b, self.num_kv_heads, groups, self.head_dim)
        elif groups > 1:  # query head n reads kv head n // groups
            k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, self.num_heads, -1, self.head_dim)
            v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, self.num_heads, -1, self.head_dim)
        if self.softcap is None and t == 1 and (nk := _native_attention(k, v)) is not None:
            out = self._attend_native(nk, q, k, v, mask)  # (B, K, G, H)
        elif self.softcap is None:  # Gemma 1: SDPA with the same additive mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, N, T, H)
        else:  # Gemma 2: tanh cap on the scores before the mask (transformers eager, big_vision); SDPA can't
            # transformers' ops in its order, in place on the fresh scores: the same roundings, without four more
            # (heads x queries x keys) tensors a block (an 896-px prompt's block took 0.33 s, in place 0.24: by
            # hand, Intel Xeon with AMX)
            w = self._scores(q, k, t, self.float32_products).mul_(self.scale)  # (B, N, T, S); (B, K, G, S) folded
            w = w.div_(self.softcap).tanh_().mul_(self.softcap)
            if mask is not None:
                w = w.add_(mask) if mask.dtype == w.dtype else w + mask
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            out = self._values(w, v, t, self.float32_products)  # (B, N, T, H)
        out = out.reshape(b, self.num_heads, t, self.head_dim)  # the folded (B, K, G, H) back to (B, N, 1, H)
        return out.transpose(1, 2).reshape(b, t, -1)  # (B, T, N*H)

    def _attend_native(self, nk, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """Gemma 1's decode step (one query per sequence) as SDPA computes it on a CPU, in float32 from the 16-bit
        operands and rounded once, but in three calls reading the cache in place (native_attention.cpp) instead of
        SDPA's blocked kernel, whose set-up cost 54 us a layer against ~5 us of arithmetic (by hand, AMD EPYC Zen 4):
        q (B, K, G, H) against k, v (B, K, S, H) -> (B, K, G, H). Only the order of the sums differs."""
        w = nk.attention_scores(q, k).mul_(self.scale)  # (B, K, G, S) float32
        if mask is not None:
            w = w.add_(mask)  # (B, 1, 1, S) broadcast over the kv heads and their query rows
        return nk.attention_values(torch.softmax(w, -1), v).to(q.dtype)

    # Gemma 2's two products. A decode step's (T = 1) read the cache in place with native_attention.cpp where it
    # built, else in float32 on exact copies of the 16-bit operands: either way fp32 sums of exact products rounded
    # once to the model's dtype, what torch's 16-bit bmm computes, but that runs these small shapes at ~2 GFLOP/s on
    # a CPU without AVX512-BF16 (oneDNN emulates it) and copies the cache's strided view first (its heads lie
    # max_len rows apart): 14 ms of a PaliGemma 2 step. A prefill keeps torch's 16-bit products, or with `wide`
    # (float32_products) the same products in float32 one head at a time; its expanded k is contiguous already.
    @staticmethod
    def _scores(q: torch.Tensor, k: torch.Tensor, t: int, wide: bool = False) -> torch.Tensor:
        if t > 1 and wide and k.device.type == "cpu" and q.dtype != torch.float32:
            return _float32_matmul(q, k.transpose(2, 3))
        if t > 1 or k.device.type != "cpu":
            return torch.matmul(q, k.contiguous().transpose(2, 3))
        if (nk := _native_attention(k, k)) is not None:
            return nk.attention_scores(q, k).to(q.dtype)
        return torch.matmul(q.float(), k.float().transpose(2, 3)).to(q.dtype)

    @staticmethod
    def _values(w: torch.Tensor, v: torch.Tensor, t: int, wide: bool = False) -> torch.Tensor:
        if t > 1 and wide and v.device.type == "cpu" and w.dtype != torch.float32:
            return _float32_matmul(w, v)
        if t > 1 or v.device.type != "cpu":
            return torch.matmul(w, v)
        if (nk := _native_attention(v, v)) is not None:
            return nk.attention_values(w, v).to(w.dtype)
        return torch.matmul(w.float(), v.float()).to(w.dtype)


def _float32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, N, T, X) @ b (B, N, X, S), 16-bit, in float32 from the exact operands and rounded once to a's dtype (what
    a 16-bit bmm computes, up to the order of the sums), one head at a time: the float32 copies held at once are one
    head's, (B, T, X), (B, X, S) and (B, T, S) (budget/memory.py counts the last)."""
    out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=a.dtype, device=a.device)
    for n in range(a.shape[1]):
        out[:, n] = torch.matmul(a[:, n].float(), b[:, n].float())
    return out


def _native_attention(k: torch.Tensor, v: torch.Tensor):
    """The native kernels where they built and can read `k` and `v` (views of the cache, (B, K, S, H) on the CPU
    with each head's S x H block dense), else None."""
    for kv in (k, v):
        if kv.device.type != "cpu" or kv.stride(-1) != 1 or (kv.shape[2] > 1 and kv.stride(2) != kv.shape[3]):
            return None
    return native.kernels()


def _native_decode(x: torch.Tensor):
    """The native kernels for a decode step's pointwise work (native_decode.cpp: one position per sequence, x's
    axis -2 of length 1, on the CPU, where they built), else None: a prefill keeps torch's ops, and with them the
    bits transformers computes."""
    if x.device.type != "cpu" or x.dim() < 2 or x.shape[-2] != 1 or x.dtype not in _NATIVE_DTYPES:
        return None
    return native.kernels()


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place: no two more (M, I) activations (68 MB each for a batch-8 prefill of PaliGemma-3B).
        gate, up = self.gate_proj(x), self.up_proj(x)
        if (nk := _native_decode(x)) is not None and gate.is_contiguous() and up.is_contiguous():
            return self.down_proj(nk.gelu_tanh_mul_(gate, up))
        return self.down_proj(torch.ops.aten.gelu_(gate, approximate="tanh").mul_(up))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.sliding = cfg.is_sliding(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        # Gemma 1's only other norm is called post_attention_layernorm but sits *before* the MLP
        # (big_vision pre_ffw_norm); Gemma 2 adds the real post-norms and a pre_feedforward norm.
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x, rope, masks, cache, start, last_only=False):
        mask = masks[1] if self.sliding else masks[0]
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, start, last_only)
        x = x[:, -h.shape[1] :]  # with last_only, only the last position goes on
        if self.post_norms:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(nn.Module):
    """`language_model.model`: embedding table, layers, final norm. Returns normed hidden states."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens.lookup(ids)  # (B, T, D) in the model dtype, whether the table is dense or int8
        # sqrt(D) rounded to the model dtype, as transformers and big_vision do (bf16: sqrt(2048) -> 45.25).
        return x * torch.tensor(self.cfg.hidden_size**0.5).to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        masks: tuple[torch.Tensor | None, torch.Tensor | None],
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with `last_only`, (B, 1, D): the last layer computes its keys and values for
        every token (the cache holds them) but its queries, output projection and MLP for the last one only,
        as nothing reads the other positions' outputs (1/L of a prefill's decoder work saved)."""
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, masks, cache, start, last_only and i == last)
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    """`language_model`: only `model`; the output head is the tied embedding (no lm_head parameter)."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.model = GemmaModel(cfg)
        self.final_logit_softcap = cfg.final_logit_softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.model.embed_tokens.logits(hidden)  # (B, T, V): x @ E^T
        if self.final_logit_softcap is not None:
            out = torch.tanh(out / self.final_logit_softcap) * self.final_logit_softcap
        return out
