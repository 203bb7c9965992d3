"""The load and sampling option groups of the commands; each group arrives as one validated library object.

Click parses the types; the values are checked by `LoadOptions` / `SamplingOptions` themselves (the server gets
the same checks), and an OptionError is shown as click's usage error on the option it names. Defaults are not
restated here: they are those objects' fields, and the writers' defaults are read off the library functions.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..checkpoint.safetensors_io import WEIGHT_DTYPES
from ..errors import OptionError, PromptError
from ..formats import registry
from ..model.processor import check_prompt
from ..model.sampling import SamplingOptions
from ..pretrained.options import DEVICES, LoadOptions
from ..units import parse_size


def library_default(fn: Callable[..., object], name: str) -> Any:
    """A library function's own default, so the CLI never restates it."""
    return inspect.signature(fn).parameters[name].default


def flag(option: str) -> str:
    """A library field name as the CLI spells its option: max_memory -> '--max-memory'."""
    return f"'--{option.replace('_', '-')}'"


def validated(build: Callable[..., Any], **values: Any) -> Any:
    """`build(**values)`, an OptionError shown as click's error on the option it names, the library's field names
    in its message spelled as the CLI's options (max_memory -> --max-memory)."""
    try:
        return build(**values)
    except OptionError as e:
        fields = [f.name for f in dataclasses.fields(LoadOptions)] + [
            f.name for f in dataclasses.fields(SamplingOptions)
        ]
        message = re.sub(rf"\b({'|'.join(fields)})\b", lambda m: flag(m[1]).strip("'"), str(e))
        raise click.BadParameter(message, param_hint=flag(e.option) if e.option else None) from None


class ByteSize(click.ParamType):
    """A size such as 5GB, 500MB, 100KiB or a byte count, parsed by units.parse_size (the writers' shard sizes)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _check_prompt(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_prompt(value)
    except PromptError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def _grouped(options: list[Callable[[Any], Any]], build: Callable[..., Any], keys: list[str], name: str):
    """Decorator: add `options` to a command, which receives their values as one `name=build(**values)`."""

    def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = validated(build, **{k: kwargs.pop(k) for k in keys})
            return f(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorator


_S = SamplingOptions()
sampling_options = _grouped(
    [
        click.option("--max-new-tokens", type=int, default=_S.max_new_tokens, show_default=True,
                     help="Stop after this many generated tokens (or at EOS)."),
        click.option("--temperature", type=float, default=_S.temperature, show_default=True,
                     help="Sampling temperature; 0 is greedy (top-k / top-p then unused)."),
        click.option("--top-k", type=int, default=_S.top_k, help="Sample among the k likeliest."),
        click.option("--top-p", type=float, default=_S.top_p,
                     help="Nucleus sampling: the likeliest tokens holding this much probability."),
        click.option("--seed", type=int, default=_S.seed, help="Seed for sampling (reproducible output)."),
    ],
    SamplingOptions,
    ["max_new_tokens", "temperature", "top_k", "top_p", "seed"],
    "sampling",
)  # fmt: skip


def _load(
    dtype: str, device: str, quantize: str | None, kernels: str | None, zero_copy: bool, force: bool,
    max_memory: str | None, verify: str | None,
) -> LoadOptions:  # fmt: skip
    # --verify alone arrives as "" (its flag_value): the Hub's records; with a value, a sums file.
    checks: bool | Path = Path(verify) if verify else verify == ""
    return LoadOptions(dtype, device, quantize, kernels, zero_copy, preflight=not force, max_memory=max_memory,
                       verify=checks)  # fmt: skip


_L = LoadOptions()
load_options = _grouped(
    [
        click.option("--dtype", type=click.Choice(["auto", *WEIGHT_DTYPES]), default=_L.dtype, show_default=True,
                     help="Weight dtype in memory (converted while the checkpoint streams in); auto: the 16-bit "
                          "dtype measured fastest on this machine (see `info`)."),
        click.option("--device", type=click.Choice(DEVICES), default=_L.device, show_default=True,
                     help="auto: cuda when available, else cpu."),
        click.option("--quantize", metavar="FORMAT", default=_L.quantize,
                     help=f"Quantize the weights while they stream in: {' or '.join(registry.quantize_modes())} "
                          "(int8: half the 16-bit size; int4: a quarter for the decoder, cpu). A pre-quantized "
                          "checkpoint is read as stored."),
        click.option("--kernels", metavar="SPEC", default=_L.kernels,
                     help="Override the measured kernel choice, e.g. int8=int8pack/dequant (FORMAT=DECODE/PREFILL) "
                          "or 'reference'."),
        click.option("--zero-copy", is_flag=True, default=_L.zero_copy,
                     help="Map the weight files instead of copying them (cpu; checkpoint stored as loaded)."),
        click.option("--force", is_flag=True, default=not _L.preflight,
                     help="Load even if the memory pre-flight says the model will not fit."),
        click.option("--max-memory", metavar="SIZE", default=_L.max_memory,
                     help="Keep the process's peak RSS within SIZE (e.g. 3GB): layers that do not fit are read from "
                          "the checkpoint for every token, the next while one computes (cpu; docs/streaming.md)."),
        click.option("--verify", is_flag=False, flag_value="", default=None, metavar="[SUMS]",
                     help="Check each shard's sha256 before loading: against the Hub's download records "
                          "(huggingface-cli download --local-dir, or the Hub cache), or a sha256sum-format SUMS "
                          "file (--verify=SUMS). Catches corrupted weight bytes, which no header check can."),
    ],
    _load,
    ["dtype", "device", "quantize", "kernels", "zero_copy", "force", "max_memory", "verify"],
    "load",
)  # fmt: skip

# No `exists=True`: the library says what is wrong with a model directory (missing, a file, a Hub id not cached).
MODEL_DIR = click.Path(path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
NEW_DIR = click.Path(file_okay=False, path_type=Path)
prompt_argument = click.argument("prompt", callback=_check_prompt)
