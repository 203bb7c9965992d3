"""The PaliGemma entry points: a Hub-layout directory -> our model, or transformers' own class, streamed.

- `load_model` builds our `PaliGemmaForConditionalGeneration` on meta from config.json and streams the
  checkpoint into it (loader.py). Stored keys of any of the four writers are normalised onto our names,
  which are the Hub's (docs/model.md, "Key-name variants"); a stored lm_head is the tied embedding and is
  skipped. Our model has no buffers, so nothing needs repair.
- `load_hf_model(path, device, dtype) -> (model, tokenizer)` keeps the API of hkproj/pytorch-paligemma's
  `load_hf_model` ("hf": a Hugging Face checkpoint; the model is ours).
- `load_transformers_model` fills transformers' `PaliGemmaForConditionalGeneration` through the same
  stream: it re-ties lm_head and rebuilds the buffers `to_empty` leaves as garbage (`position_ids`, rope
  `inv_freq`, `embed_scale`), as transformers' `_init_weights` builds them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .config import load_config
from .errors import CheckpointError
from .loader import DEFAULT_CHUNK_BYTES, stream_checkpoint
from .paligemma import PaliGemmaForConditionalGeneration
from .safetensors_io import refuse_partial
from .verify import verify_checkpoint

LM_HEAD = "lm_head.weight"  # stored only by some writers; equals the embedding (tied)
EMBEDDING = "language_model.model.embed_tokens.weight"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model directory, or a CheckpointError that says what is wrong (missing, a file, a Hub id)."""
    p = Path(path)
    if p.is_dir():
        refuse_partial(p)
        return p
    if p.exists():
        raise CheckpointError(f"{p}: not a directory; pass the model directory (config.json, *.safetensors)")
    if _HUB_ID.fullmatch(str(path)):
        raise CheckpointError(
            f"{path}: no such directory. This looks like a Hub model id; weights are read from a local directory "
            f"only. Download them first (after accepting the license on the Hub): "
            f"huggingface-cli download {path} --local-dir {p.name}, then pass {p.name}"
        )
    raise CheckpointError(f"{p}: no such directory")


def normalize_key(key: str) -> str:
    """Map any of the four writers' names (docs/model.md, "Key-name variants") onto our (Hub) parameter names."""
    if key in ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight"):
        return LM_HEAD
    k = key.removeprefix("model.")
    for old, new in (
        ("vision_tower.vision_model.", "vision_tower.vision_model."),
        ("vision_tower.", "vision_tower.vision_model."),  # transformers 5.x drops `vision_model.`
        ("multi_modal_projector.linear.", "multi_modal_projector.linear."),
        ("multi_modal_projector.", "multi_modal_projector.linear."),
        ("language_model.model.", "language_model.model."),
        ("language_model.", "language_model.model."),  # transformers >= 4.52 in memory
    ):
        if k.startswith(old):
            return new + k[len(old) :]
    return key


def load_model(
    model_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    *,
    zero_copy: bool = False,
    preflight: bool = True,
    reserve: Mapping[str, int] | None = None,
    verify: bool | str | os.PathLike = False,
    progress: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_phase: Callable[[str], None] | None = None,
) -> PaliGemmaForConditionalGeneration:
    """Stream a Hub-layout PaliGemma / PaliGemma 2 checkpoint into our model, in eval mode.

    `zero_copy` maps the shards instead of copying (CPU, checkpoint stored in `dtype`); `preflight` refuses
    a load that would not fit in the memory available now, with `reserve` (bytes by name, e.g.
    `memory.request_bytes(...).parts()`) on top of the weights; `verify` first checks every shard's checksum
    (verify.py): True against the Hub's download records, a path against that sums file; `progress` draws a
    bar on stderr; `on_phase(name)` is called at each loading phase (verify, build, materialize, shard i/n, done).
    """
    model_dir = resolve_model_dir(model_path)
    if verify is not False:
        if on_phase:
            on_phase("verify")
        verify_checkpoint(model_dir, None if verify is True else verify)
    if on_phase:
        on_phase("build")
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(load_config(model_dir))
    return stream_checkpoint(
        model, model_dir, dtype, device, key_map=normalize_key, tied={LM_HEAD: EMBEDDING},
        zero_copy=zero_copy, preflight=preflight, reserve=reserve, progress=progress, chunk_bytes=chunk_bytes,
        on_phase=on_phase,
    )  # fmt: skip


def load_hf_model(
    model_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16
):
    """(model, tokenizer) from a Hub checkpoint directory, streamed (hkproj/pytorch-paligemma's API).

    config.json is validated first, then the tokenizer must agree with it on the prompt's ids (AutoTokenizer
    reads config.json too), all before the weights load.
    """
    from .processor import check_tokenizer, load_tokenizer

    model_dir = resolve_model_dir(model_path)
    cfg = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer(tokenizer, cfg, model_dir)
    return load_model(model_dir, device=device, dtype=dtype), tokenizer


# --- transformers' own class through the same stream ----------------------------------------------------

_TO_TRANSFORMERS = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
)


def transformers_key(key: str) -> str | None:
    """Stored key -> transformers 5.x `PaliGemmaForConditionalGeneration` parameter name."""
    name = normalize_key(key)
    if name == LM_HEAD:
        return LM_HEAD
    for ours, theirs in _TO_TRANSFORMERS:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return None


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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
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
