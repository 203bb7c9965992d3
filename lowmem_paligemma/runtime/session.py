"""One runtime for every front end: load options, sampling options, a loaded session, one prompt, drawing.

The CLI commands, `make demo` and the benchmarks all go through here, so what a user runs is what is
measured. A `Session` holds the model and its processor; `Session.encode` turns an image into features
once, and `run_prompt` generates for one prompt on them, timing prefill (prompt in, first token out)
and decode (every further token) separately; `run_prompts` is its batched counterpart (several images
and prompts generated together). `session_memory_bytes` says what a session will take before loading
it, from the checkpoint headers: the Ray workers of `batch --ray` ask for that much.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..budget.memory import model_bytes, request_bytes
from ..budget.residency import DEFAULT_NEW_TOKENS
from ..budget.streamer import LayerStreamer
from ..checkpoint.safetensors_io import WEIGHT_DTYPES, dtype_name
from ..errors import OutputError, PromptError
from ..formats.chooser import cache_path, machine_key
from ..model.config import load_config
from ..model.generate import check_length, encode_image, generate, generate_batch
from ..model.paligemma import PaliGemmaForConditionalGeneration
from ..model.processor import Processor, TextStream
from ..model.tasks import VQVAEDecoder, draw_detections, parse_detections, paste_mask, to_pixels
from ..pretrained.load import build_model, choose_compute, load_memory_bytes, load_model, plan_memory, resolve_model_dir

# The 16-bit dtype measured fastest on this machine for a request (kernels.choose_dtype): bfloat16 and float16
# take the same memory, and which computes faster differs from CPU to CPU.
DEFAULT_DTYPE = "auto"


@dataclass(frozen=True)
class LoadOptions:
    dtype: str = DEFAULT_DTYPE  # "auto" or a key of safetensors_io.WEIGHT_DTYPES
    device: str = "cpu"  # cpu / cuda / mps (front ends resolve "auto")
    quantize: str | None = None  # None, "int8" or "int4" (quant.py)
    kernels: str | None = None  # None: measured (kernels.py); or a spec such as "int8=int8pack/dequant"
    zero_copy: bool = False  # map the shards instead of copying (CPU, checkpoint stored as loaded)
    preflight: bool = True  # refuse a load that would not fit in the memory available now
    max_memory: int | None = None  # peak RSS budget in bytes: layers that do not fit are streamed (residency.py)
    prefetch: bool = True  # read the next streamed layer while one computes (False: the ablation)
    verify: bool | Path = False  # check shard checksums first: True the Hub's records, a Path a sums file (verify.py)


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Session:
    """A loaded model and its processor, reused for every prompt of a command."""

    model: PaliGemmaForConditionalGeneration
    processor: Processor
    load_s: float
    options: LoadOptions

    @property
    def weight_bytes(self) -> int:
        """Bytes of the resident weights (not the streamed layers', which visit the layer buffers)."""
        plan = getattr(self.model, "residency", None)
        streamed = plan.streamed_parameters(self.model) if plan is not None else set()
        return sum(p.nbytes for name, p in self.model.named_parameters() if name not in streamed)

    @property
    def streamer(self) -> LayerStreamer | None:
        """The layer streamer when some layers are read per forward (a memory budget), else None."""
        return getattr(self.model, "streamer", None)

    def close(self) -> None:
        """Stop the layer streamer's reader (if any); the session cannot generate afterwards."""
        if self.streamer is not None:
            self.streamer.close()

    @property
    def dtype(self) -> str:
        """The compute dtype actually loaded ("auto" resolved)."""
        return dtype_name(self.model.dtype)

    def encode(self, image: Image.Image) -> torch.Tensor:
        """(1, N, D) image features: computed once per image and reused by every prompt on it."""
        return encode_image(self.model, self.processor.pixel_values(image))


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

    With `max_new_tokens`, the request (`prompt` on one image; "" for prompts that come later) is checked
    against the model's context, and its KV cache and activations (memory.py) join the memory pre-flight,
    so a request that cannot fit is refused before the model is allocated. Under a memory budget the plan
    holds that request (or, without `max_new_tokens`, the image tokens and 64 more and residency's default);
    the process's RSS is measured once the processor is loaded.
    """
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(model_dir)
    cfg = load_config(model_dir)
    processor = Processor.from_pretrained(model_dir, cfg)
    dtype = WEIGHT_DTYPES.get(options.dtype, torch.bfloat16)  # "auto" is a 16-bit dtype: the same bytes
    reserve, prompt_len = None, None
    if max_new_tokens is not None:
        prompt_len = int(processor.prompt_inputs(prompt)[0].shape[1])
        check_length(cfg.text, prompt_len, max_new_tokens)
        reserve = request_bytes(cfg, prompt_len, max_new_tokens, dtype).parts()
    model = load_model(
        model_dir, device=options.device, dtype=options.dtype, quantize=options.quantize, kernels=options.kernels,
        zero_copy=options.zero_copy, preflight=options.preflight, reserve=reserve, verify=options.verify,
        progress=progress, on_phase=on_phase, max_memory=options.max_memory, prompt_tokens=prompt_len,
        max_new_tokens=max_new_tokens or DEFAULT_NEW_TOKENS, prefetch=options.prefetch,
    )  # fmt: skip
    return Session(model, processor, time.perf_counter() - t0, options)


def describe_load(model_dir: str | os.PathLike, options: LoadOptions = LoadOptions()) -> dict[str, Any]:
    """What loading `model_dir` with `options` would do on this machine, without reading a weight: the dtype
    and kernels chosen (measured now or read from the cache, with the timings), the bytes of the weights, and
    under a memory budget the residency plan (for a default request: SamplingOptions' max_new_tokens)."""
    model_dir = resolve_model_dir(model_dir)
    model = build_model(model_dir, options.quantize, options.device)
    dtype, report = choose_compute(model, options.dtype, options.device, options.kernels, options.zero_copy)
    out = {
        "machine": machine_key(),
        "kernel_cache": str(cache_path()),
        "dtype": dtype_name(dtype),
        "quantize": model.quantize,  # the option, or how the checkpoint is stored
        "weight_bytes": model_bytes(model, dtype),
        "kernels": report.to_json(),
        "why": report.lines(),
    }
    if options.max_memory is not None:
        plan, _ = plan_memory(model, model_dir, options.max_memory, dtype, report.plan, options.device,
                              max_new_tokens=SamplingOptions.max_new_tokens)  # fmt: skip
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
        on_text(rest)  # a byte run the stream held back: the pieces now add up to `text`
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
    pre-flight's estimate (weights from the headers + margin) plus the batch's request (memory.py). Nothing is read
    but headers and config.json; the prompt's token count is bounded by its UTF-8 length (a piece is >= 1 byte).
    """
    if options.max_memory is not None:  # the budget holds the weights kept resident and the request
        return options.max_memory
    model_dir = resolve_model_dir(model_dir)
    cfg = load_config(model_dir)
    dtype = WEIGHT_DTYPES.get(options.dtype, torch.bfloat16)  # "auto" is a 16-bit dtype: the same bytes
    prompt_tokens = cfg.num_image_tokens + 1 + len((prompt + "\n").encode())  # image tokens, <bos>, prompt + \n
    work = request_bytes(cfg, prompt_tokens, sampling.max_new_tokens, dtype, batch).total
    return load_memory_bytes(model_dir, dtype, quantize=options.quantize) + work


DRAW_TASKS = ("detect", "segment")  # the prompts whose answers hold <loc> boxes (docs/model.md, "Output formats")


def check_draw(prompt: str, path: Path, source: Path | None = None) -> None:
    """Refuse, before any work, a drawing that cannot be what the user wants.

    The prompt must ask for boxes; `path` must not be the input image `source` (the answer drawn over the
    picture it came from would be lost with the original); its directory must exist: none is created.
    """
    words = prompt.split()
    if not words or words[0] not in DRAW_TASKS:
        raise PromptError(f'drawing needs a detect or segment prompt (e.g. "detect cat ; dog"), got {prompt!r}')
    if source is not None and _same_file(path, source):
        raise OutputError(f"{path}: this is the input image; draw into a new file")
    _check_directory(path)


def _check_directory(path: Path) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"{path}: the directory {path.parent} does not exist (it is not created for you)")


def _same_file(a: Path, b: Path) -> bool:
    # resolve() sees through symbolic links and "..", samefile() through hard links.
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def draw_output(image: Image.Image, text: str, path: Path, vae: VQVAEDecoder | None) -> list[dict[str, Any]]:
    """Parse detect/segment output, draw it on `image` as a PNG at `path`; the objects in pixels (x0, y0, x1, y1).

    An answer without boxes still writes `path` (an unchanged copy: no objects is an answer); the caller says so.
    """
    _check_directory(path)
    dets = parse_detections(text)
    width, height = image.size
    boxes = [to_pixels(d, width, height) for d in dets]
    masks = None
    if vae is not None and any(d.seg is not None for d in dets):
        masks = [
            None if d.seg is None else paste_mask(vae.decode_masks([d.seg])[0], box, width, height)
            for d, box in zip(dets, boxes)
        ]
    draw_detections(image, dets, path, masks)
    return [
        {
            "label": d.label,
            "box": list(box),
            "mask": masks is not None and masks[i] is not None,
            "seg": d.seg is not None,
        }
        for i, (d, box) in enumerate(zip(dets, boxes))
    ]
