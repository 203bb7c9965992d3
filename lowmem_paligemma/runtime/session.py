"""One runtime for every front end: a loaded session, one prompt, several prompts at once.

The CLI commands, the server, `make demo` and the benchmarks all go through here, so what a user runs is what
is measured. A `Session` holds the loaded model (pretrained/load.py's `LoadedModel`) and its processor;
`Session.encode` turns an image into features once, and `run_prompt` generates for one prompt on them, timing
prefill (prompt in, first token out) and decode (every further token) separately; `run_prompts` is its batched
counterpart (several images and prompts generated together). `session_memory_bytes` says what a session will
take before loading it, from the checkpoint headers: the Ray workers of `batch --ray` ask for that much.

A request is sized once, here (`size_request`: its length checked against the model's context, its KV cache
and activations from budget/memory.py), and that one estimate goes to the load's pre-flight and memory plan.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..budget.memory import RequestMemory, request_bytes
from ..checkpoint.safetensors_io import WEIGHT_DTYPES, dtype_name
from ..formats.chooser import cache_path, machine_key
from ..model.config import PaliGemmaConfig, load_config
from ..model.generate import check_length, encode_image, generate, generate_batch
from ..model.paligemma import PaliGemmaForConditionalGeneration
from ..model.processor import Processor
from ..model.sampling import SamplingOptions
from ..model.text_stream import TextStream
from ..pretrained.build import build_model, choose_compute
from ..pretrained.load import LoadedModel, default_request, load_memory_bytes, load_model, plan_memory
from ..pretrained.model_dir import resolve_model_dir
from ..pretrained.options import LoadOptions


@dataclass
class Session:
    """A loaded model and its processor, reused for every prompt of a command (or of a server's life)."""

    loaded: LoadedModel
    processor: Processor
    options: LoadOptions
    load_s: float  # the processor and the model together

    @property
    def model(self) -> PaliGemmaForConditionalGeneration:
        return self.loaded.model

    @property
    def dtype(self) -> str:
        """The compute dtype actually loaded ("auto" resolved)."""
        return dtype_name(self.loaded.dtype)

    @property
    def device(self) -> str:
        return self.loaded.model.device.type

    @property
    def weight_bytes(self) -> int:
        return self.loaded.weight_bytes

    def close(self) -> None:
        """Stop the layer streamer's reader (if any); the session cannot generate afterwards."""
        self.loaded.close()

    def encode(self, image: Image.Image) -> torch.Tensor:
        """(1, N, D) image features: computed once per image and reused by every prompt on it."""
        return encode_image(self.model, self.processor.pixel_values(image))


def size_request(
    cfg: PaliGemmaConfig, prompt_tokens: int, max_new_tokens: int, dtype: torch.dtype, batch: int = 1
) -> RequestMemory:
    """The request's memory (budget/memory.py), after checking it fits the model's context (ContextLengthError)."""
    check_length(cfg.text, prompt_tokens, max_new_tokens)
    return request_bytes(cfg, prompt_tokens, max_new_tokens, dtype, batch)


def load_session(
    model_dir: str | os.PathLike,
    options: LoadOptions = LoadOptions(),
    on_phase: Callable[[str], None] | None = None,
    progress: bool = False,
    *,
    prompt: str = "",
    max_new_tokens: int | None = None,
) -> Session:
    """Processor first (small files: a bad tokenizer fails before the weights), then the streamed model.

    With `max_new_tokens`, the request (`prompt` on one image; "" for prompts that come later) is sized once
    (`size_request`): checked against the model's context, and its KV cache and activations join the memory
    pre-flight and, under a memory budget, the plan, so a request that cannot fit is refused before the model
    is allocated. Without it, a budget plans for an assumed prompt and the default new tokens.
    """
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(model_dir)
    cfg = load_config(model_dir)
    processor = Processor.from_pretrained(model_dir, cfg)
    request = None
    if max_new_tokens is not None:
        dtype = WEIGHT_DTYPES.get(options.dtype, torch.bfloat16)  # "auto" is a 16-bit dtype: the same bytes
        prompt_tokens = int(processor.prompt_inputs(prompt)[0].shape[1])
        request = size_request(cfg, prompt_tokens, max_new_tokens, dtype)
    loaded = load_model(model_dir, options, request=request, progress=progress, on_phase=on_phase)
    return Session(loaded, processor, options, time.perf_counter() - t0)


def describe_load(model_dir: str | os.PathLike, options: LoadOptions = LoadOptions(), retune: bool = False) -> dict:
    """What loading `model_dir` with `options` would do on this machine, without reading a weight: the dtype
    and kernels chosen (measured now or read from the kernel cache, with the timings; `retune`: timed anew), the
    bytes of the weights, and under a memory budget the residency plan (for a default request)."""
    from ..checkpoint.preflight import model_bytes

    model_dir = resolve_model_dir(model_dir)
    device = options.resolved_device()
    model, quantize = build_model(model_dir, options.quantize)
    dtype, report = choose_compute(model, options.dtype, device, options.kernels, options.zero_copy, retune)
    out = {
        "machine": machine_key(),
        "kernel_cache": str(cache_path()),
        "dtype": dtype_name(dtype),
        "quantize": quantize,  # the option, or how the checkpoint is stored
        "weight_bytes": model_bytes(model, dtype),
        "kernels": report.to_json(),
        "why": report.lines(),
    }
    if options.max_memory is not None:
        plan, _ = plan_memory(model, model_dir, options.max_memory, dtype, report, default_request(model, dtype))
        out["residency"] = plan.describe()
    return out


@dataclass
class Generation:
    text: str  # decoded with special tokens skipped (<loc>/<seg> survive)
    token_ids: list[int]  # as generated, including a final EOS
    prompt_tokens: int
    prefill_s: float  # prompt in, first token out
    decode_s: float  # every further token

    @property
    def tokens_per_s(self) -> float | None:
        n = len(self.token_ids) - 1  # the first token comes out of the prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        rate = self.tokens_per_s
        return {
            "output": self.text,
            "tokens": len(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "tokens_per_s": None if rate is None else round(rate, 2),
        }


def run_prompt(
    session: Session,
    image_features: torch.Tensor,
    prompt: str,
    sampling: SamplingOptions = SamplingOptions(),
    on_text: Callable[[str], None] | None = None,
    phase: Callable[[str], AbstractContextManager[object]] = nullcontext,
) -> Generation:
    """Generate for one prompt on already-encoded image features; `on_text` receives the text as it grows.

    `phase(name)` wraps the "prefill" and "decode" steps, e.g. with `MemoryProfiler.phase`.
    """
    input_ids, token_type_ids = session.processor.prompt_inputs(prompt)
    tokens = generate(
        session.model, input_ids, token_type_ids, image_features=image_features,
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, seed=sampling.seed,
    )  # fmt: skip
    stream = TextStream(session.processor.tokenizer)
    ids: list[int] = []

    def take(token: int) -> None:
        ids.append(token)
        if on_text and (piece := stream.push(token)):
            on_text(piece)

    t0 = time.perf_counter()
    with phase("prefill"):
        take(next(tokens))  # generate() always yields at least one token
    t1 = time.perf_counter()
    with phase("decode"):
        for token in tokens:
            take(token)
    t2 = time.perf_counter()
    if on_text and (rest := stream.flush()):
        on_text(rest)  # what the stream held back: the pieces now add up to `text`
    text = session.processor.decode(ids)
    return Generation(text, ids, int(input_ids.shape[1]), t1 - t0, t2 - t1)


def run_prompts(
    session: Session,
    image_features: torch.Tensor,
    prompts: list[str],
    sampling: SamplingOptions = SamplingOptions(),
) -> list[Generation]:
    """Row i answers prompts[i] on image_features[i] (B, N, D), all rows generated together.

    Each row's tokens are what `run_prompt` gives it alone (generate.generate_batch). Every row's
    prefill_s is the shared prefill; its decode_s runs until its own last token.
    """
    inputs = [session.processor.prompt_inputs(p) for p in prompts]
    steps = generate_batch(
        session.model, [ids for ids, _ in inputs], [types for _, types in inputs], image_features=image_features,
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, seed=sampling.seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    tokens: list[list[int]] = [[t] for t in next(steps)]  # the first step gives every row a token
    t1 = time.perf_counter()
    ends = [t1] * len(prompts)
    for step in steps:
        now = time.perf_counter()
        for i, token in enumerate(step):
            if token is not None:
                tokens[i].append(token)
                ends[i] = now
    return [
        Generation(session.processor.decode(ids), ids, int(x.shape[1]), t1 - t0, end - t1)
        for ids, (x, _), end in zip(tokens, inputs, ends)
    ]


def session_memory_bytes(
    model_dir: str | os.PathLike, options: LoadOptions, prompt: str, sampling: SamplingOptions, batch: int
) -> int:
    """Bytes a session loaded with `options` needs to answer `prompt` for `batch` images at once: the load
    pre-flight's estimate (weights from the headers + margin) plus the batch's request (budget/memory.py). Nothing
    is read but headers and config.json; the prompt's token count is bounded by its UTF-8 length (a piece is
    >= 1 byte)."""
    if options.max_memory is not None:  # the budget holds the weights kept resident and the request
        return options.max_memory
    model_dir = resolve_model_dir(model_dir)
    cfg = load_config(model_dir)
    dtype = WEIGHT_DTYPES.get(options.dtype, torch.bfloat16)  # "auto" is a 16-bit dtype: the same bytes
    prompt_tokens = cfg.num_image_tokens + 1 + len((prompt + "\n").encode())  # image tokens, <bos>, prompt + \n
    work = request_bytes(cfg, prompt_tokens, sampling.max_new_tokens, dtype, batch).total
    return load_memory_bytes(model_dir, dtype, quantize=options.quantize) + work
