"""Option definitions and validation shared by the commands; each group arrives as one typed object.

Defaults are not restated here: the sampling and load defaults are the fields of runtime.py's
`SamplingOptions` / `LoadOptions`, the writers' defaults are read from the library functions' signatures.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from ..checkpoint.safetensors_io import WEIGHT_DTYPES
from ..errors import OptionError, PromptError
from ..formats.chooser import parse_spec
from ..formats.quant import QUANT_MODES
from ..model.processor import check_prompt
from ..runtime.session import LoadOptions, SamplingOptions
from ..units import parse_size

DEVICES = ("auto", "cpu", "cuda", "mps")


def library_default(fn: Callable[..., object], name: str) -> Any:
    """A library function's own default, so the CLI never restates it."""
    return inspect.signature(fn).parameters[name].default


class ByteSize(click.ParamType):
    """A size such as 5GB, 500MB, 100KiB or a byte count (units.py)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _resolve_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available (no GPU, or a CPU-only torch build)", ctx, param)
    if value == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter("MPS (Apple GPU) is not available on this machine", ctx, param)
    return value


def _check_prompt(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_prompt(value)
    except PromptError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def _check_finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


def _check_kernels(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_spec(value)
        except OptionError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return value


def _grouped(options: list[Callable[[Any], Any]], build: Callable[..., Any], keys: list[str], name: str):
    """Decorator: add `options` to a command, which receives their values as one `name=build(**values)`."""

    def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = build(**{k: kwargs.pop(k) for k in keys})
            return f(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorator


_S = SamplingOptions()
sampling_options = _grouped(
    [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=_S.max_new_tokens, show_default=True,
                     help="Stop after this many generated tokens (or at EOS)."),
        click.option("--temperature", type=click.FloatRange(min=0.0), default=_S.temperature, show_default=True,
                     callback=_check_finite, help="Sampling temperature; 0 is greedy (top-k / top-p then unused)."),
        click.option("--top-k", type=click.IntRange(min=1), default=_S.top_k, help="Sample among the k likeliest."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=_S.top_p,
                     help="Nucleus sampling: the likeliest tokens holding this much probability."),
        click.option("--seed", type=int, default=_S.seed, help="Seed for sampling (reproducible output)."),
    ],
    SamplingOptions,
    ["max_new_tokens", "temperature", "top_k", "top_p", "seed"],
    "sampling",
)  # fmt: skip


def _load(
    dtype: str, device: str, quantize: str | None, kernels: str | None, zero_copy: bool, force: bool,
    max_memory: int | None, verify: str | None,
) -> LoadOptions:  # fmt: skip
    # --verify alone arrives as "" (its flag_value): the Hub's records; with a value, a sums file.
    checks: bool | Path = Path(verify) if verify else verify == ""
    return LoadOptions(dtype, device, quantize, kernels, zero_copy, preflight=not force, max_memory=max_memory,
                       verify=checks)  # fmt: skip


def _check_sums_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value and not Path(value).is_file():
        raise click.BadParameter(f"{value}: no such sums file", ctx, param)
    return value


_L = LoadOptions()
load_options = _grouped(
    [
        click.option("--dtype", type=click.Choice(["auto", *WEIGHT_DTYPES]), default=_L.dtype, show_default=True,
                     help="Weight dtype in memory (converted while the checkpoint streams in); auto: the 16-bit "
                          "dtype measured fastest on this machine (see `info`)."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     callback=_resolve_device, help="auto: cuda when available, else cpu."),
        click.option("--quantize", type=click.Choice(QUANT_MODES), default=_L.quantize,
                     help="Quantize the weights while they stream in: int8 (half the 16-bit size), int4 (a quarter "
                          "for the decoder; cpu). A pre-quantized checkpoint is read as stored."),
        click.option("--kernels", metavar="SPEC", default=_L.kernels, callback=_check_kernels,
                     help="Override the measured kernel choice, e.g. int8=int8pack/dequant (FORMAT=DECODE/PREFILL) "
                          "or 'reference'."),
        click.option("--zero-copy", is_flag=True, default=_L.zero_copy,
                     help="Map the weight files instead of copying them (cpu; checkpoint stored as loaded)."),
        click.option("--force", is_flag=True, default=not _L.preflight,
                     help="Load even if the memory pre-flight says the model will not fit."),
        click.option("--max-memory", type=ByteSize(), default=_L.max_memory,
                     help="Keep the process's peak RSS within SIZE (e.g. 3GB): layers that do not fit are read from "
                          "the checkpoint for every token, the next while one computes (cpu; docs/streaming.md)."),
        click.option("--verify", is_flag=False, flag_value="", default=None, metavar="[SUMS]",
                     callback=_check_sums_file,
                     help="Check each shard's sha256 before loading: against the Hub's download records "
                          "(huggingface-cli download --local-dir, or the Hub cache), or a sha256sum-format SUMS "
                          "file (--verify=SUMS). Catches corrupted weight bytes, which no header check can."),
    ],
    _load,
    ["dtype", "device", "quantize", "kernels", "zero_copy", "force", "max_memory", "verify"],
    "load",
)  # fmt: skip

# No `exists=True`: the library says what is wrong with a model directory (missing, a file, a Hub id).
MODEL_DIR = click.Path(path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
NEW_DIR = click.Path(file_okay=False, path_type=Path)
prompt_argument = click.argument("prompt", callback=_check_prompt)
