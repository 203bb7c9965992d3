"""The ways of loading PaliGemma that bench/load_memory.py compares; each runs alone in a fresh child process.

    python -m bench.load_strategies --strategy ours --checkpoint DIR --dtype bfloat16 --out timeline.json

Strategies (the loaded model ends in the target dtype unless said otherwise):
  load-state-dict  hkproj/pytorch-paligemma's `load_hf_model`: the model built in float32 with random init, every
                   shard read into one dict with `safetensors.torch.load_file`, `load_state_dict`; stays float32
  to-empty-half    the recipe of that port's memory-optimized fork, on our model class: meta build, `to_empty` in
                   float32, `param.data = param.data.half()`, then per shard `safe_open` + `get_tensor` + `copy_`
  transformers     `PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=...)`
  ours             `lowmem_paligemma.load_model(path, dtype=...)`
  ours-int8        the same with `quantize="int8"`; ours-int4 with `quantize="int4"`
  ours-zero-copy   `load_model(path, dtype=torch.bfloat16, zero_copy=True)` (a checkpoint stored in bf16)
  ours-hf-class    transformers' own class filled by our stream (`load_transformers_model`)
The child samples its own memory (`MemoryProfiler`, /proc/self/status), marks phases, and after the load reads
one element of every 4 KiB weight page ("touch"), as the first forward would, so weights left mapped from the
file show their footprint too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

from bench.supervise import protect_the_machine

SAMPLE_INTERVAL_S = 0.05
SETTLED, TOUCH = "settled", "touch every weight page"  # phase marks the parent reads back


def load_state_dict(path: Path, dtype: Any, mark) -> Any:
    from safetensors.torch import load_file

    from lowmem_paligemma.checkpoint.safetensors_io import checkpoint_files
    from lowmem_paligemma.model.config import load_config
    from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration

    mark("build float32 (random init)")
    model = PaliGemmaForConditionalGeneration(load_config(path))
    state: dict[str, Any] = {}
    files = checkpoint_files(path)
    for i, shard in enumerate(files, 1):
        mark(f"load_file {i}/{len(files)}")
        state.update(load_file(shard))
    mark("load_state_dict")
    model.load_state_dict(state, strict=True)
    del state
    return model.eval()


def to_empty_half(path: Path, dtype: Any, mark) -> Any:
    import torch
    from safetensors import safe_open

    from lowmem_paligemma.checkpoint.safetensors_io import checkpoint_files
    from lowmem_paligemma.model.config import load_config
    from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration

    mark("meta build")
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(load_config(path))
    mark("to_empty float32")
    model = model.to_empty(device="cpu")
    mark("half()")
    for _, param in model.named_parameters():
        param.data = param.data.half()
    state_dict = model.state_dict()
    files = checkpoint_files(path)
    with torch.no_grad():
        for i, shard in enumerate(files, 1):
            mark(f"shard {i}/{len(files)}")
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in state_dict:
                        tensor = f.get_tensor(key)
                        if tensor.dtype == torch.float32:
                            tensor = tensor.half()
                        state_dict[key].copy_(tensor)
                        del tensor
    return model.eval()


def transformers(path: Path, dtype: Any, mark) -> Any:
    from transformers import PaliGemmaForConditionalGeneration

    mark("from_pretrained")
    return PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def ours(path: Path, dtype: Any, mark, **options) -> Any:
    from lowmem_paligemma import load_model

    return load_model(path, dtype=dtype, on_phase=mark, **options).model


def ours_hf_class(path: Path, dtype: Any, mark) -> Any:
    from lowmem_paligemma import load_transformers_model

    return load_transformers_model(path, dtype=dtype, on_phase=mark)


STRATEGIES = {
    "load-state-dict": (load_state_dict, ["safetensors.torch", "lowmem_paligemma"]),
    "to-empty-half": (to_empty_half, ["safetensors", "lowmem_paligemma"]),
    "transformers": (transformers, ["transformers"]),
    "ours": (ours, ["lowmem_paligemma"]),
    "ours-int8": (lambda p, d, m: ours(p, d, m, quantize="int8"), ["lowmem_paligemma"]),
    "ours-int4": (lambda p, d, m: ours(p, d, m, quantize="int4"), ["lowmem_paligemma"]),
    "ours-zero-copy": (lambda p, d, m: ours(p, d, m, zero_copy=True), ["lowmem_paligemma"]),
    "ours-hf-class": (ours_hf_class, ["transformers", "lowmem_paligemma"]),
}


def model_bytes(model: Any) -> int:
    """Bytes of the model's tensors, each storage counted once (a tied head is not counted twice)."""
    seen: dict[tuple[int, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[(id(t) if t.is_mkldnn else t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def touch_pages(model: Any) -> None:
    """Read one element per 4 KiB page of every weight, as a first forward would."""
    for p in model.parameters():
        if p.is_mkldnn:  # reordered into oneDNN's layout at load: anonymous memory, resident already
            continue
        flat = p.detach().reshape(-1)
        flat[:: max(1, 4096 // flat.element_size())].float().sum()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--out", type=Path, required=True, help="the timeline (JSON)")
    args = p.parse_args(argv)
    protect_the_machine()
    import torch

    from lowmem_paligemma.profiling.profiler import MemoryProfiler

    load, preimports = STRATEGIES[args.strategy]
    # Import time is not load time: the modules each loader uses come in first. transformers imports its model
    # classes lazily (1.6 s here, torch._dynamo included), so resolve the class too.
    for module in preimports:
        importlib.import_module(module)
    if "transformers" in preimports:
        importlib.import_module("transformers").PaliGemmaForConditionalGeneration  # noqa: B018
    dtype = getattr(torch, args.dtype)
    had_dynamo = "torch._dynamo" in sys.modules
    with MemoryProfiler(interval=SAMPLE_INTERVAL_S) as prof:
        prof.mark("start")
        t0 = time.perf_counter()
        model = load(args.checkpoint, dtype, prof.mark)
        seconds = time.perf_counter() - t0
        prof.mark("loaded")
        time.sleep(0.2)  # a few samples of the settled state
        prof.mark(SETTLED)  # the final RSS; the table's load numbers stop here
        with prof.phase(TOUCH):
            touch_pages(model)
    prof.meta.update(
        strategy=args.strategy, checkpoint=str(args.checkpoint), dtype=args.dtype, load_s=seconds,
        model_bytes=model_bytes(model),
        param_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        # torch imports torch._dynamo (~0.9 s) the first time some ops run on `meta` (nn.init on an Embedding
        # built there): a cost inside the load, worth naming when a row pays it.
        dynamo_imported_in_load=not had_dynamo and "torch._dynamo" in sys.modules,
        label=f"{args.strategy}: {args.checkpoint.name} -> {args.dtype}",
    )  # fmt: skip
    prof.to_json(args.out)


if __name__ == "__main__":
    main()
