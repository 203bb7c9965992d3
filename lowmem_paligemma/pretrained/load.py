"""The PaliGemma entry points: a Hub-layout directory (or a Hub id in the local cache) -> our model, streamed.

- `load_model(path, options, request=...)` builds our `PaliGemmaForConditionalGeneration` on meta from config.json
  (build.py: the weight format asked for or stored, the dtype and kernels measured on this machine) and streams the
  checkpoint into it (checkpoint/loader.py), stored keys of any writer normalised onto ours (keys.py). It returns a
  `LoadedModel`: the model and what the load decided (format, dtype, kernel report, residency plan, the layer
  streamer, the time taken). Under a memory budget (`max_memory`) the plan (`plan_memory`, budget/residency.py)
  leaves the streamed layers on meta and a `budget.streamer.LayerStreamer` serves them.
- The request (its KV cache and activations, budget/memory.py) is sized by the caller, once, and passed in: the
  pre-flight reserves it and the residency plan holds it.
- `load_hf_model(path, device, dtype) -> (model, tokenizer)` keeps the API of hkproj/pytorch-paligemma's
  `load_hf_model` ("hf": a Hugging Face checkpoint; the model is ours).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import defaults
from ..budget.memory import RequestMemory, request_bytes
from ..budget.residency import KERNEL_BUFFERS, REQUEST, ResidencyPlan, plan_residency, scratch_bytes, streamable_units
from ..budget.streamer import LayerStreamer
from ..checkpoint.loader import LoadPlan, checkpoint_plan, stream_checkpoint
from ..checkpoint.preflight import memory_needed, model_bytes
from ..checkpoint.verify import verify_checkpoint
from ..errors import OptionError
from ..formats.chooser import KernelReport
from ..formats.kernels import relayout_as_loaded, use_kernels
from ..model.paligemma import PaliGemmaForConditionalGeneration
from .build import build_model, choose_compute
from .keys import TIED, normalize_key
from .model_dir import resolve_model_dir
from .options import LoadOptions


@dataclass
class LoadedModel:
    """A loaded model and what its load decided."""

    model: PaliGemmaForConditionalGeneration
    quantize: str | None  # the weight format in effect: the option, or how the checkpoint is stored (None: dense)
    kernels: KernelReport  # the kernels chosen per format, and why
    residency: ResidencyPlan | None  # under a memory budget: what stays, what streams
    streamer: LayerStreamer | None  # the reader of the streamed layers (None: everything resident)
    load_s: float

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def weight_bytes(self) -> int:
        """Bytes of the resident weights (not the streamed layers', which visit the layer buffers)."""
        streamed = self.residency.streamed_parameters(self.model) if self.residency is not None else set()
        return model_bytes(self.model, self.model.dtype, exclude=streamed)

    def close(self) -> None:
        """Stop the layer streamer's reader (if any); the model cannot run its streamed layers afterwards."""
        if self.streamer is not None:
            self.streamer.close()


def plan_memory(
    model: PaliGemmaForConditionalGeneration,
    model_dir: Path,
    max_memory: int | ResidencyPlan,
    dtype: torch.dtype,
    kernels: KernelReport,
    request: RequestMemory,
) -> tuple[ResidencyPlan, LoadPlan]:
    """The residency plan for `model` (on meta) under a budget of `max_memory` bytes of peak RSS (or the plan
    given), for `request`, with the checkpoint matched to it; raises before anything is allocated (residency.py)."""
    load_plan = checkpoint_plan(model, model_dir, normalize_key, TIED)
    if isinstance(max_memory, ResidencyPlan):
        layers = [(u.name, u.nbytes) for u in streamable_units(model, dtype)]
        if [(u.name, u.nbytes) for u in max_memory.units] != layers:
            raise OptionError("the residency plan was made for another model, dtype or quantization", "max_memory")
        return max_memory, load_plan
    plan = plan_residency(model, max_memory, dtype, request.total, load_plan=load_plan,
                          scratch=scratch_bytes(model, kernels.plan, dtype))  # fmt: skip
    return plan, load_plan


def default_request(model: PaliGemmaForConditionalGeneration, dtype: torch.dtype) -> RequestMemory:
    """The request planned for when the caller names none: an assumed prompt and the default new tokens."""
    prompt = defaults.assumed_prompt_tokens(model.cfg.num_image_tokens)
    return request_bytes(model.cfg, prompt, defaults.MAX_NEW_TOKENS, dtype)


def load_model(
    model_path: str | os.PathLike,
    options: LoadOptions | None = None,
    *,
    request: RequestMemory | None = None,
    residency: ResidencyPlan | None = None,
    progress: bool = False,
    on_phase: Callable[[str], None] | None = None,
    chunk_bytes: int = defaults.CHUNK_BYTES,
    direct_io: bool | None = None,
    **keywords,
) -> LoadedModel:
    """Stream a Hub-layout PaliGemma / PaliGemma 2 checkpoint into our model, in eval mode.

    `options` says how (pretrained/options.py: dtype, device, quantize, kernels, zero_copy, preflight, max_memory,
    prefetch, verify); its fields may also be given as keywords (`load_model(path, dtype=torch.bfloat16,
    quantize="int8")`), on top of `options`. `request` (budget/memory.py) is what the caller will generate: the
    pre-flight refuses a load whose weights and request do not fit in the memory available now, and a memory budget
    holds it (without one: an assumed prompt and the default new tokens). `residency` uses a plan made before
    (tests, benchmarks) instead of planning for `max_memory`. `progress` draws a bar on stderr; `on_phase(name)`
    is called at each phase (verify, build, materialize, shard i/n, done). `direct_io` False reads streamed layers
    through the page cache, dropping each page after use, instead of with O_DIRECT (None: where the filesystem
    takes it).
    """
    t0 = time.perf_counter()
    options = replace(options or LoadOptions(), **keywords) if keywords else options or LoadOptions()
    device = options.resolved_device()
    model_dir = resolve_model_dir(model_path)
    phase = on_phase or (lambda name: None)
    if options.verify is not False:
        phase("verify")
        verify_checkpoint(model_dir, None if options.verify is True else options.verify)
    phase("build")
    model, quantize = build_model(model_dir, options.quantize)
    dtype, report = choose_compute(
        model, options.dtype, device, options.kernels, options.zero_copy, requests=options.requests
    )
    reserve = request.parts() if request is not None else None
    plan, streamed, load_plan = None, set(), None
    if options.max_memory is not None or residency is not None:
        if device.type != "cpu":
            raise OptionError("max_memory streams layers into CPU memory; it runs on the CPU only", "max_memory")
        budget = residency if residency is not None else options.max_memory
        plan, load_plan = plan_memory(model, model_dir, budget, dtype, report, request or default_request(model, dtype))
        streamed = plan.streamed_parameters(model)
        buffers = plan.buffers * plan.buffer_bytes + plan.staging_bytes
        reserve = {"streamed-layer buffers": buffers, **(reserve or {REQUEST: plan.parts[REQUEST]})}
    elif kernel_buffers := scratch_bytes(model, report.plan, dtype):  # (a budget's plan counts them as a part)
        reserve = {**(reserve or {}), KERNEL_BUFFERS: kernel_buffers}
    # The advice names a smaller format, never one the checkpoint is stored in (that is not an option).
    advice = {None: " or quantize the weights (--quantize int8, or int4 for a quarter)", "int8": " or --quantize int4"}
    advice = advice.get(quantize, "") if quantize == options.quantize else ""
    model = stream_checkpoint(
        model, model_dir, dtype, device, key_map=normalize_key, tied=TIED, zero_copy=options.zero_copy,
        preflight=options.preflight, reserve=reserve, progress=progress, chunk_bytes=chunk_bytes, on_phase=on_phase,
        advice=advice, exclude=streamed, drop_cache=plan is not None,
        finish=None if options.zero_copy else relayout_as_loaded(model, report.plan),
    )  # fmt: skip
    use_kernels(model, report.plan)
    streamer = None
    if streamed:
        streamer = LayerStreamer(model, plan, load_plan.restrict(streamed), prefetch=options.prefetch,
                                 progress=progress, direct=direct_io)  # fmt: skip
    return LoadedModel(model, quantize, report, plan, streamer, time.perf_counter() - t0)


def load_memory_bytes(
    model_path: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    *,
    quantize: str | None = None,
    chunk_bytes: int = defaults.CHUNK_BYTES,
) -> int:
    """Bytes `load_model(model_path, dtype=dtype, quantize=quantize)` needs, as its pre-flight counts them, from
    the config and headers on meta (the headers are matched too, so a bad checkpoint fails here already)."""
    model_dir = resolve_model_dir(model_path)
    model, _ = build_model(model_dir, quantize)
    checkpoint_plan(model, model_dir, normalize_key, TIED)
    return memory_needed(model, dtype, chunk_bytes)


def load_hf_model(
    model_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16
):
    """(model, tokenizer) from a Hub checkpoint directory, streamed (hkproj/pytorch-paligemma's API).

    config.json is validated first, then the tokenizer must agree with it on the prompt's ids (AutoTokenizer
    reads config.json too), all before the weights load.
    """
    from ..model.config import load_config
    from ..model.processor import check_tokenizer, load_tokenizer

    model_dir = resolve_model_dir(model_path)
    cfg = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer(tokenizer, cfg, model_dir)
    return load_model(model_dir, device=device, dtype=dtype).model, tokenizer
