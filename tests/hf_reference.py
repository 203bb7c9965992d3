"""transformers as the numerical oracle: tiny random PaliGemma checkpoints written by transformers itself."""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem_paligemma.model.config import PaliGemmaConfig


def hf_config(cfg: PaliGemmaConfig):
    from transformers import PaliGemmaConfig as HFConfig

    return HFConfig(**cfg.to_hf())


def write_hf_checkpoint(cfg: PaliGemmaConfig, out_dir: Path, seed: int = 0) -> Path:
    """Random weights via transformers' own init and save_pretrained (5.x key layout, several shards).

    Matrices are scaled x3 and norm weights perturbed so soft-caps, (1 + w) norms and LayerNorm affine
    all matter (docs/model.md, "Making tiny test models that can fail"): a port that gets one of them wrong cannot pass.
    """
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.mul_(3.0)
    model.save_pretrained(out_dir, max_shard_size="100KB")
    return out_dir


def hf_load(model_dir: Path, dtype: torch.dtype, attn: str | None = "eager"):
    """The reference model; attn=None is transformers' default (SDPA for SigLIP and Gemma 1, eager for Gemma 2)."""
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration.from_pretrained(model_dir, attn_implementation=attn, dtype=dtype).eval()


def prompt_inputs(cfg: PaliGemmaConfig, batch: int = 2, text: int = 12) -> tuple[torch.Tensor, ...]:
    """ids, token types, attention mask (B, N + 1 + text) and pixels (B, 3, S, S): the image tokens, BOS, random
    text; a prefix of 6 tokens + "\n", then a causal suffix (token type 1)."""
    g = torch.Generator().manual_seed(1)
    n = cfg.num_image_tokens
    ids = torch.randint(5, 500, (batch, n + 1 + text), generator=g)
    ids[:, :n] = cfg.image_token_index
    ids[:, n] = cfg.bos_token_id
    tt = torch.zeros_like(ids)
    tt[:, n + 7 :] = 1
    pv = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids, tt, torch.ones_like(ids), pv
