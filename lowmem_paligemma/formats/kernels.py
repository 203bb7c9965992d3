"""A kernel plan ({format name: KernelChoice}) put to work on a loaded model.

The plan comes from chooser.py (measured on this machine, cached) or from an override; each layer gets the
choice for its format, and the format puts its weight into the layout that choice needs (dense: oneDNN's packed
layout). A per-model setting, not a global one: two models in one process can differ.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import registry
from .base import KernelChoice, Scratch


def use_kernels(model: nn.Module, plan: dict[str, KernelChoice]) -> None:
    """Give every layer of `model` the choice for its format (formats missing from `plan` keep theirs), one
    layer at a time.

    A layer whose weight is still on meta is streamed in per forward (budget/residency.py): its bytes arrive in
    the checkpoint's plain layout each time, so it takes the reference kernels where the choice needs a layout.
    Every layer that keeps a buffer for its kernels (base.Scratch) shares the model's one. Modules that run products of
    their own (Gemma 2's prefill attention, `float32_products`) run them in float32 where the dense prefill does
    ("upcast": the chooser measured 16-bit GEMMs slower on this machine)."""
    scratch = next((m.scratch for m in model.modules() if getattr(m, "scratch", None) is not None), None) or Scratch()
    dense = plan.get(registry.get("dense").name)
    for module in model.modules():
        if hasattr(module, "scratch"):
            module.scratch = scratch
        if dense is not None and hasattr(module, "float32_products"):  # attention's own products (model/gemma.py)
            module.float32_products = dense.prefill == "upcast"
        fmt = registry.of(module)
        if fmt is None or fmt.name not in plan:
            continue
        choice = plan[fmt.name]
        if any(p.is_meta for p in module.parameters(recurse=False)):
            if choice.decode in fmt.layouts or choice.prefill in fmt.layouts:
                choice = fmt.reference
            module.kernels = choice
        else:
            fmt.use(module, choice)


def relayout_as_loaded(model: nn.Module, plan: dict[str, KernelChoice]) -> Callable[[str], None]:
    """A loader `finish` hook (checkpoint.loader.stream_into): each layer takes its kernels as soon as its weight
    is loaded, so a reordering into a kernel's layout runs beside the remaining reads instead of after them.
    `use_kernels` does the rest (the layers whose weight is filled, not copied)."""
    modules = dict(model.named_modules())

    def finish(param: str) -> None:
        name, _, leaf = param.rpartition(".")
        module = modules.get(name)
        fmt = registry.of(module) if module is not None else None
        if leaf == "weight" and fmt is not None and fmt.name in plan and not hasattr(module, "lookup"):
            fmt.use(module, plan[fmt.name])

    return finish
