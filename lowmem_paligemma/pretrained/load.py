"""The PaliGemma entry points: a Hub-layout directory -> our model, or transformers' own class, streamed.

- `load_model` builds our `PaliGemmaForConditionalGeneration` on meta from config.json and streams the
  checkpoint into it (loader.py). Stored keys of any of the four writers are normalised onto our names,
  which are the Hub's (docs/model.md, "Key-name variants"); a stored lm_head is the tied embedding and is
  skipped. Our model has no buffers, so nothing needs repair. Under a memory budget (`max_memory`) the plan
  (`plan_memory`, residency.py) leaves the streamed layers on meta and a `streamer.LayerStreamer` serves them.
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

from ..budget.memory import memory_needed
from ..budget.residency import (
    DEFAULT_NEW_TOKENS,
    REQUEST,
    ResidencyPlan,
    default_prompt_tokens,
    plan_residency,
    request_bytes,
    scratch_bytes,
    streamable_units,
)
from ..budget.streamer import LayerStreamer
from ..checkpoint.loader import DEFAULT_CHUNK_BYTES, LoadPlan, checkpoint_plan, stream_checkpoint
from ..checkpoint.safetensors_io import WEIGHT_DTYPES, refuse_partial
from ..checkpoint.verify import verify_checkpoint
from ..errors import CheckpointError, OptionError
from ..formats.chooser import KernelReport, choose_dtype, choose_kernels, layer_shapes
from ..formats.compressed import stored_mode
from ..formats.ops import KernelChoice, relayout_as_loaded, use_kernels
from ..formats.quant import INT4_GROUP, quantize_model
from ..model.config import load_config
from ..model.paligemma import PaliGemmaForConditionalGeneration

LM_HEAD = "lm_head.weight"  # stored only by some writers; equals the embedding (tied)
EMBEDDING = "language_model.model.embed_tokens.weight"
TIED = {LM_HEAD: EMBEDDING}
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


def build_model(
    model_dir: str | os.PathLike, quantize: str | None = None, device: str | torch.device = "cpu"
) -> PaliGemmaForConditionalGeneration:
    """Our model for `model_dir`'s config.json on meta (zero bytes), its layers quantized as `quantize` asks, or
    as the checkpoint is stored (a compressed-tensors `quantization_config`, compressed.py) when it is None.
    The mode in effect is kept as `model.quantize`."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(load_config(model_dir))
    stored = stored_mode(model_dir, INT4_GROUP)
    if stored is not None and quantize not in (None, stored):
        raise OptionError(
            f"{model_dir} is stored quantized to {stored}; load it as stored (no --quantize) or convert the "
            f"original checkpoint with --quantize {quantize}"
        )
    quantize = quantize or stored
    if quantize == "int4" and torch.device(device).type != "cpu":
        raise OptionError("--quantize int4 runs on the CPU only (torch's int4 kernel here is CPU code); use int8")
    model = quantize_model(model, quantize) if quantize is not None else model
    model.quantize = quantize
    return model


def choose_compute(
    model: nn.Module,
    dtype: torch.dtype | str,
    device: str | torch.device,
    kernels: str | None = None,
    zero_copy: bool = False,
) -> tuple[torch.dtype, KernelReport]:
    """The compute dtype (a torch dtype, a name, or "auto": the 16-bit dtype measured fastest here) and the
    kernel plan for `model` (on meta is enough); the report says what was chosen and why. Zero-copy weights
    stay views of the file: no kernel that reorders them."""
    rows = model.cfg.num_image_tokens + 8  # a prompt: the image tokens and a few text tokens
    why = None
    if dtype == "auto":
        largest = max(layer_shapes(model).values(), key=lambda s: s[0] * s[1])
        why = choose_dtype(largest, rows, device)
        dtype = why.choice
    if isinstance(dtype, str):
        if dtype not in WEIGHT_DTYPES:
            raise OptionError(f"dtype {dtype!r} is not auto or one of {', '.join(WEIGHT_DTYPES)}")
        dtype = WEIGHT_DTYPES[dtype]
    report = choose_kernels(model, dtype, device, spec=kernels, prompt_rows=rows, relayout=not zero_copy)
    report.details[:0] = [why] if why else []
    return dtype, report


def plan_memory(
    model: PaliGemmaForConditionalGeneration,
    model_dir: Path,
    max_memory: int | ResidencyPlan,
    dtype: torch.dtype,
    kernel_plan: dict[str, KernelChoice],
    device: str | torch.device = "cpu",
    *,
    prompt_tokens: int | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
) -> tuple[ResidencyPlan, LoadPlan]:
    """The residency plan for `model` (on meta) under a budget of `max_memory` bytes of peak RSS (or the plan
    given), with the checkpoint matched to it; raises before anything is allocated (residency.py)."""
    if torch.device(device).type != "cpu":
        raise OptionError("--max-memory streams layers into CPU memory; it runs on the CPU only")
    load_plan = checkpoint_plan(model, model_dir, normalize_key, TIED)
    if isinstance(max_memory, ResidencyPlan):
        layers = [(u.name, u.nbytes) for u in streamable_units(model, dtype)]
        if [(u.name, u.nbytes) for u in max_memory.units] != layers:
            raise OptionError("the residency plan was made for another model, dtype or quantization")
        return max_memory, load_plan
    prompt = default_prompt_tokens(model.cfg) if prompt_tokens is None else prompt_tokens
    plan = plan_residency(
        model, max_memory, dtype, request_bytes(model.cfg, prompt, max_new_tokens, dtype), load_plan=load_plan,
        scratch=scratch_bytes(model, kernel_plan, dtype),
    )  # fmt: skip
    return plan, load_plan


def load_model(
    model_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float16,
    *,
    quantize: str | None = None,
    kernels: str | None = None,
    zero_copy: bool = False,
    preflight: bool = True,
    reserve: Mapping[str, int] | None = None,
    verify: bool | str | os.PathLike = False,
    progress: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_phase: Callable[[str], None] | None = None,
    max_memory: int | ResidencyPlan | None = None,
    prompt_tokens: int | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    prefetch: bool = True,
    direct_io: bool | None = None,
) -> PaliGemmaForConditionalGeneration:
    """Stream a Hub-layout PaliGemma / PaliGemma 2 checkpoint into our model, in eval mode.

    `dtype` "auto" takes the 16-bit dtype measured fastest here (kernels.choose_dtype). `quantize` "int8" or
    "int4" quantizes while streaming (quant.py); a pre-quantized checkpoint (compressed.py) is read as stored,
    with `quantize` None or equal to its mode.
    `kernels` overrides the measured kernel choice (kernels.py: a spec, or "reference"). `zero_copy` maps the
    shards instead of copying (CPU, checkpoint stored as loaded); `preflight` refuses a load that would not
    fit in the memory available now, with `reserve` (bytes by name, e.g. `memory.request_bytes(...).parts()`)
    on top of the weights; `verify` first checks every shard's checksum (verify.py): True against the Hub's
    download records, a path against that sums file; `progress` draws a bar on stderr; `on_phase(name)` is
    called at each phase (verify, build, materialize, shard i/n, done).
    The kernel report (what was chosen and why) is kept as `model.kernel_report`.

    `max_memory` (bytes of peak RSS for the whole process, or a `residency.ResidencyPlan`) keeps what fits
    and streams the other layers from the checkpoint for every forward (docs/streaming.md); the budget holds
    a request of `prompt_tokens` (default: the image tokens and 64 more) plus `max_new_tokens`. `prefetch`
    False reads each streamed layer only when it is needed (the ablation); `direct_io` False reads streamed
    layers through the page cache, dropping each page after use, instead of with O_DIRECT (None: O_DIRECT where
    the filesystem takes it). The plan is `model.residency`, the streamer (None when nothing is streamed)
    `model.streamer`.
    """
    model_dir = resolve_model_dir(model_path)
    if verify is not False:
        if on_phase:
            on_phase("verify")
        verify_checkpoint(model_dir, None if verify is True else verify)
    if on_phase:
        on_phase("build")
    model = build_model(model_dir, quantize, device)
    dtype, report = choose_compute(model, dtype, device, kernels, zero_copy)
    residency, streamed = None, set()
    if max_memory is not None:
        if zero_copy:
            raise OptionError("--zero-copy maps every weight into the process; it cannot keep to --max-memory")
        residency, load_plan = plan_memory(
            model, model_dir, max_memory, dtype, report.plan, device, prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        streamed = residency.streamed_parameters(model)
        buffers = residency.buffers * residency.buffer_bytes + residency.staging_bytes
        reserve = {"streamed-layer buffers": buffers, **(reserve or {REQUEST: residency.parts[REQUEST]})}
    advice = {None: " or quantize the weights (--quantize int8, or int4 for a quarter)", "int8": " or --quantize int4"}
    advice = advice.get(model.quantize, "") if model.quantize == quantize else ""  # a stored mode is not an option
    model = stream_checkpoint(
        model, model_dir, dtype, device, key_map=normalize_key, tied=TIED, zero_copy=zero_copy,
        preflight=preflight, reserve=reserve, progress=progress, chunk_bytes=chunk_bytes, on_phase=on_phase,
        advice=advice, exclude=streamed, drop_cache=max_memory is not None,
        finish=None if zero_copy else relayout_as_loaded(model, report.plan),
    )  # fmt: skip
    use_kernels(model, report.plan)
    model.kernel_report = report
    model.residency = residency
    model.streamer = None
    if streamed:
        model.streamer = LayerStreamer(model, residency, load_plan.restrict(streamed), prefetch=prefetch,
                                       progress=progress, direct=direct_io)  # fmt: skip
    return model


def load_memory_bytes(
    model_path: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    *,
    quantize: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """Bytes `load_model(model_path, dtype=dtype, quantize=quantize)` needs, as its pre-flight counts them, from
    the config and headers on meta (the headers are matched too, so a bad checkpoint fails here already)."""
    model_dir = resolve_model_dir(model_path)
    model = build_model(model_dir, quantize)
    checkpoint_plan(model, model_dir, normalize_key, TIED)
    return memory_needed(model, dtype, chunk_bytes)


def load_hf_model(
    model_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16
):
    """(model, tokenizer) from a Hub checkpoint directory, streamed (hkproj/pytorch-paligemma's API).

    config.json is validated first, then the tokenizer must agree with it on the prompt's ids (AutoTokenizer
    reads config.json too), all before the weights load.
    """
    from ..model.processor import check_tokenizer, load_tokenizer

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
