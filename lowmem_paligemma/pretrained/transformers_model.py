"""transformers' own `PaliGemmaForConditionalGeneration`, filled by our stream instead of `from_pretrained`.

Used as the numerical oracle in the tests and the benchmarks (same weights, same stream, same memory floor).
`to_empty` leaves non-persistent buffers as garbage and unties lm_head: `repair_transformers_buffers` rebuilds
`position_ids`, rope `inv_freq` and `embed_scale` as transformers' `_init_weights` builds them, and the `tie` hook
re-ties lm_head to the embedding.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from .. import defaults
from ..checkpoint.loader import stream_checkpoint
from ..errors import CheckpointError
from .keys import LM_HEAD, transformers_key
from .model_dir import resolve_model_dir


def repair_transformers_buffers(model: nn.Module) -> None:
    """Rebuild the non-persistent buffers of a transformers model after `to_empty`, as its `_init_weights` does."""
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if name == "position_ids":  # (1, N) arange
                buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
            elif name in ("inv_freq", "original_inv_freq") and hasattr(module, "compute_default_rope_parameters"):
                if getattr(module, "rope_type", "default") != "default":
                    raise CheckpointError(f"cannot rebuild {module_name}.{name}: rope type {module.rope_type!r}")
                value, _ = module.compute_default_rope_parameters(module.config)
                buf.copy_(value)
            elif name == "embed_scale" and hasattr(module, "scalar_embed_scale"):
                buf.fill_(module.scalar_embed_scale)
            else:
                raise CheckpointError(f"do not know how to rebuild buffer {module_name}.{name}; pass repair=")


def load_transformers_model(
    model_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    attn_implementation: str | None = None,
    *,
    preflight: bool = True,
    progress: bool = False,
    chunk_bytes: int = defaults.CHUNK_BYTES,
    on_phase: Callable[[str], None] | None = None,
):
    """transformers' `PaliGemmaForConditionalGeneration`, filled by our stream instead of `from_pretrained`."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration as HFModel

    model_dir = resolve_model_dir(model_path)
    config = HFConfig.from_pretrained(model_dir)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = HFModel(config)
    model.config.dtype = dtype

    def tie(m: nn.Module) -> None:
        m.lm_head.weight = m.model.language_model.embed_tokens.weight

    with torch.no_grad():
        return stream_checkpoint(
            model, model_dir, dtype, device, key_map=transformers_key,
            tied={LM_HEAD: "model.language_model.embed_tokens.weight"}, tie=tie, repair=repair_transformers_buffers,
            preflight=preflight, progress=progress, chunk_bytes=chunk_bytes, on_phase=on_phase,
        )  # fmt: skip
