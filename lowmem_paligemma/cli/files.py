"""The commands that write checkpoints: synth (random weights in the Hub layout) and convert (another dtype,
optionally pre-quantized)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
import torch

from ..checkpoint.safetensors_io import WEIGHT_DTYPES, dtype_name
from ..model.config import PRESETS
from ..pretrained.convert import convert_checkpoint
from ..pretrained.synth import tiny_checkpoint, write_checkpoint
from ..units import format_size
from .options import MODEL_DIR, NEW_DIR, ByteSize, library_default, validated
from .report import byte_progress, user_errors


def write_synthetic(
    out_dir: Path,
    preset: str | None,
    gemma2: bool,
    dtype: torch.dtype,
    max_shard_bytes: int | None,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """`preset` None: the tiny test model. `max_shard_bytes` None: the writer's default for that size."""
    shard = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    if preset is None:
        return tiny_checkpoint(out_dir, gemma2, dtype=dtype, seed=seed, progress=progress, **shard)
    return write_checkpoint(out_dir, PRESETS[preset], dtype=dtype, seed=seed, progress=progress, **shard)


@click.command("synth")
@click.argument("out_dir", type=NEW_DIR)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="A full-size configuration (e.g. paligemma-3b-224).")
@click.option("--tiny", is_flag=True, help="The tiny test configuration instead (a few hundred KB).")
@click.option("--gemma2", is_flag=True, help="With --tiny: the PaliGemma 2 (Gemma 2 decoder) variant.")
@click.option(
    "--dtype",
    type=click.Choice(list(WEIGHT_DTYPES)),
    show_default=True,
    default=dtype_name(library_default(write_checkpoint, "dtype")),
    help="Stored weight dtype.",
)
@click.option(
    "--max-shard-size",
    type=ByteSize(),
    help="Largest shard file, e.g. 5GB, 100KB [default: the Hub's 5GB; small shards for --tiny].",
)
@click.option(
    "--seed",
    type=int,
    default=library_default(write_checkpoint, "seed"),
    show_default=True,
    help="Weights depend only on the seed (and the tensor names), not on dtype or sharding.",
)
def synth_command(
    out_dir: Path, preset: str | None, tiny: bool, gemma2: bool, dtype: str, max_shard_size: int | None, seed: int
) -> None:
    """Write a random-weight checkpoint in the exact Hub layout (weights, config, tokenizer) into OUT_DIR."""
    if (preset is None) == (not tiny):
        raise click.UsageError("choose one of --preset NAME or --tiny")
    if gemma2 and not tiny:
        raise click.BadParameter(
            "goes with --tiny; PaliGemma 2 presets are named paligemma2-*", param_hint="'--gemma2'"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise click.ClickException(f"{out_dir}: exists and is not empty; choose a new directory")
    with user_errors(), byte_progress("writing") as progress:
        path = write_synthetic(out_dir, preset, gemma2, WEIGHT_DTYPES[dtype], max_shard_size, seed, progress)
    click.echo(path)


@click.command("convert")
@click.argument("src", type=MODEL_DIR)
@click.argument("dst", type=NEW_DIR)
@click.option(
    "--dtype",
    type=click.Choice(list(WEIGHT_DTYPES)),
    show_default=True,
    default=dtype_name(library_default(convert_checkpoint, "dtype")),
    help="Dtype of the float tensors.",
)
@click.option(
    "--max-shard-size",
    type=ByteSize(),
    show_default=True,
    default=format_size(library_default(convert_checkpoint, "max_shard_bytes")),
    help="Largest shard file, e.g. 5GB, 2GB, 100KB.",
)
@click.option(
    "--quantize",
    metavar="FORMAT",
    help="Store the towers' linear layers quantized, as a load with --quantize would (int4 where its shape rules "
    "hold, int8 elsewhere), in compressed-tensors' layout: transformers loads it too (docs/quantization.md).",
)
def convert_command(src: Path, dst: Path, dtype: str, max_shard_size: int, quantize: str | None) -> None:
    """Rewrite the checkpoint in SRC with its float tensors in DTYPE, into the new directory DST (low RAM).

    Config, tokenizer and processor files come along; e.g. the Hub's float32 weights become half the size.
    """
    with user_errors(), byte_progress("converting") as progress:
        path = validated(convert_checkpoint, src_dir=src, dst_dir=dst, dtype=WEIGHT_DTYPES[dtype],
                         max_shard_bytes=max_shard_size, progress=progress, quantize=quantize)  # fmt: skip
    click.echo(path)
