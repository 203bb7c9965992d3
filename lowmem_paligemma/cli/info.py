"""`info`: what this machine is, and for a model what a load would choose (dtype, kernels) and why."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from ..formats.chooser import cache_path, machine_key
from ..machine import cpu
from ..pretrained.options import LoadOptions
from ..runtime.session import describe_load
from ..units import format_bytes
from .options import MODEL_DIR, load_options
from .report import user_errors


@click.command("info")
@click.argument("model_dir", type=MODEL_DIR, required=False)
@load_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead.")
@click.option("--retune", is_flag=True, help="Time the kernels again now, whatever the kernel cache holds (MODEL_DIR).")
def info_command(model_dir: Path | None, load: LoadOptions, as_json: bool, retune: bool) -> None:
    """Show the machine (CPU model and flags, torch, threads) and, for MODEL_DIR, the dtype and kernels a load
    would use here, with the timings they were chosen by (measured now, or from the kernel cache; a timing taken
    while other programs ran is used but not cached)."""
    if retune and model_dir is None:
        raise click.BadParameter("needs MODEL_DIR: the kernels are timed on its layer shapes", param_hint="'--retune'")
    with user_errors():
        out = {"cpu": cpu().describe(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": machine_key(), "kernel_cache": str(cache_path())}  # fmt: skip
        if model_dir is not None:
            out |= describe_load(model_dir, load, retune)
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"cpu         : {out['cpu']}\ntorch       : {out['torch']}, {out['threads']} threads")
    click.echo(f"kernel cache: {out['kernel_cache']}")
    if model_dir is not None:
        quantized = f", {out['quantize']}" if out["quantize"] else ""
        click.echo(f"weights     : {format_bytes(out['weight_bytes'])} ({out['dtype']}{quantized})")
        for line in out["why"]:
            click.echo(f"  {line}")
        for line in out.get("residency", []):
            click.echo(line)
