"""PaliGemma: SigLIP vision tower + linear projector + Gemma / Gemma 2 decoder, prefix-LM attention.

Parameter names are the Hub checkpoint keys (docs/model.md, "Checkpoint layout"): `vision_tower.vision_model.*`,
`multi_modal_projector.linear.*`, `language_model.model.*`. The output head is the embedding table
(tied), so there is no `lm_head` parameter to keep in sync.

Sequence layout (docs/model.md, "Prompt and tokens"): [<image>] * N + [<bos>] + prefix + ["\n"] (token type 0:
one bidirectional block) then the suffix / generated tokens (token type 1: causal).

Axes: B batch, L sequence, T query length, S key length, N image tokens, D text width, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.dense import Linear
from .config import PaliGemmaConfig
from .gemma import GemmaForCausalLM, KVCache, RowCaches
from .siglip import SiglipVisionModel


class PaliGemmaMultiModalProjector(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.linear = Linear(cfg.vision.hidden_size, cfg.projection_dim)  # no activation (gelu_fast is unused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def make_attn_mask(
    token_type_ids: torch.Tensor,
    valid: torch.Tensor | None,
    q_start: int,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask (B, 1, T, S) for queries at positions q_start..S-1 over keys 0..S-1.

    allowed[q, k] = (causal(q, k) and in_window(q, k)) or (tt[q] == 0 and tt[k] == 0), then and valid[k]
    (transformers 5.23 `masking_utils`: the prefix block is OR-ed in on sliding layers too; docs/model.md,
    "Prefix-LM mask" and "Sliding window").
    Batched prompts are left-padded (generate.generate_batch): a row's real tokens fill consecutive slots,
    so slot distance is position distance and the window counts positions; `valid` (B, S) drops the pads.

    Example, tt = [0 0 0 1 1] (three prefix tokens, two suffix tokens), no window:
        q0: 1 1 1 0 0     the prefix is one bidirectional block,
        q1: 1 1 1 0 0
        q2: 1 1 1 0 0
        q3: 1 1 1 1 0     suffix tokens see the prefix and earlier suffix tokens.
        q4: 1 1 1 1 1
    """
    b, s = token_type_ids.shape
    q = torch.arange(q_start, s, device=token_type_ids.device)[:, None]  # (T, 1)
    k = torch.arange(s, device=token_type_ids.device)[None, :]  # (1, S)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    prefix = token_type_ids == 0  # (B, S)
    allowed = allowed[None] | (prefix[:, q_start:, None] & prefix[:, None, :])  # (B, T, S)
    if valid is not None:
        allowed = allowed & valid[:, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class PaliGemmaForConditionalGeneration(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionModel(cfg.vision)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(cfg)
        self.language_model = GemmaForCausalLM(cfg.text)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the floating-point weights (quantized tables are int8 / uint8)."""
        return self.language_model.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.norm.weight.device

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels in [-1, 1] -> (B, N, D) features that replace the <image> tokens."""
        # Not divided by sqrt(D): transformers 5.x and big_vision use the raw projector output
        # (docs/model.md, "Forward pass").
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D): scaled text embeddings with image features scattered over <image>."""
        is_image = input_ids == self.cfg.image_token_index
        ids = input_ids
        if self.cfg.image_token_index >= self.cfg.text.vocab_size:  # out-of-vocabulary placeholder id
            ids = input_ids.masked_fill(is_image, 0)
        x = self.language_model.model.embed(ids)
        if image_features is None:  # a decode step: a generated <image> id is just an embedding row
            return x
        n_tokens = int(is_image.sum())
        if n_tokens * x.shape[-1] != image_features.numel():
            raise ValueError(
                f"prompt has {n_tokens} <image> tokens but the images give {image_features.shape[:-1].numel()} features"
            )
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))  # in order, row-major

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        cache: KVCache | RowCaches | None = None,
        start: int = 0,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for the T = L - start new tokens `input_ids[:, start:]`.

        With `cache` a RowCaches (several requests with caches of their own, gemma.py), `input_ids` (B, 1) are
        each row's new token and `positions` (B, 1) their positions: one decode step of B requests at once.

        `token_type_ids` / `attention_mask` (B, L) cover the whole sequence so far (cached keys included);
        without `token_type_ids` every token is treated as prefix (type 0) up to `start` and causal after.
        `last_only` computes logits for the last position only (generation needs no more).
        `positions` (B, T) are the new tokens' 1-indexed positions; left-padded rows pass their own
        (transformers: cumsum(attention_mask) - 1, + 1 for PaliGemma). Default: start + 1 .. L.
        """
        if isinstance(cache, RowCaches):  # each row's mask comes with its own cache
            hidden = self.language_model.model(self.embed(input_ids, None), positions, (None, None), cache)
            return self.language_model.logits(hidden)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_image(pixel_values.to(self.device))
        new_ids = input_ids[:, start:]
        if image_features is None and start == 0 and bool((new_ids == self.cfg.image_token_index).any()):
            raise ValueError("prompt has <image> tokens but no image was given")
        x = self.embed(new_ids, image_features)
        b, length = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if positions is None:
            positions = torch.arange(start, length, device=x.device)[None].expand(b, -1) + 1  # 1-indexed, as HF
        window = self.cfg.text.sliding_window
        full = make_attn_mask(token_type_ids, attention_mask, start, None, x.dtype)
        sliding = make_attn_mask(token_type_ids, attention_mask, start, window, x.dtype) if window else None
        hidden = self.language_model.model(x, positions, (full, sliding), cache, start, last_only)
        return self.language_model.logits(hidden)
