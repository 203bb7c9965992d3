"""Our model for a checkpoint directory, on meta (zero bytes): its layers in the weight format asked for (or
stored), and the compute dtype and kernels it will run with on this machine.

Which layers a quantizing format takes (`quantize_layers`): every linear layer of the two towers' blocks (decoder
and vision encoder) and the tied embedding, in the format where it `accepts` the shape and in its `fallback`
format elsewhere (int4: SigLIP's fc2, 4304 wide, is int8). The projector, norms, patch convolution and position
table stay dense (small). A pre-quantized checkpoint (compressed-tensors' layout) is read as stored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import defaults
from ..checkpoint.safetensors_io import WEIGHT_DTYPES
from ..errors import ConfigError, OptionError
from ..formats import registry
from ..formats.base import Scratch
from ..formats.chooser import KernelReport, choose_dtype, choose_kernels, layer_shapes
from ..formats.compressed import parse_quantization_config
from ..formats.dense import Embedding, Linear
from ..model.config import load_config, read_config_json
from ..model.paligemma import PaliGemmaForConditionalGeneration


def stored_format(model_dir: str | Path) -> str | None:
    """The weight format a pre-quantized checkpoint stores (its config.json's quantization_config), or None."""
    try:
        return parse_quantization_config(read_config_json(model_dir))
    except ConfigError as e:
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: {e}") from None


def quantize_layers(model: nn.Module, name: str) -> nn.Module:
    """Swap `model`'s towers' linear layers and its embedding for layers of format `name`, in place, on meta."""
    fmt = registry.get(name)
    fallback = registry.get(fmt.fallback) if fmt.fallback else None
    scratch = Scratch()  # one set of kernel buffers for the whole model (base.Scratch)
    for module_name, module in list(model.named_modules()):
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        with torch.device("meta"):
            if isinstance(module, Embedding) and module_name.endswith("embed_tokens"):
                rows, dim = module.weight.shape
                use = fmt if fmt.accepts(rows, dim) or fallback is None else fallback
                setattr(parent, child, use.embedding(rows, dim))
            elif isinstance(module, Linear) and ".layers." in module_name:  # decoder and vision-tower blocks
                o, i, bias = module.out_features, module.in_features, module.bias is not None
                use = fmt if fmt.accepts(o, i) or fallback is None else fallback
                setattr(parent, child, use.linear(i, o, bias, scratch))
    return model


def build_model(
    model_dir: str | Path, quantize: str | None = None
) -> tuple[PaliGemmaForConditionalGeneration, str | None]:
    """Our model for `model_dir`'s config.json on meta, its layers in format `quantize`, or as the checkpoint is
    stored when that is None; with the format in effect (None: dense)."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(load_config(model_dir))
    stored = stored_format(model_dir)
    if stored is not None and quantize not in (None, stored):
        raise OptionError(
            f"{model_dir} is stored quantized to {stored}; load it as stored (no --quantize) or convert the "
            f"original checkpoint with --quantize {quantize}",
            "quantize",
        )
    quantize = quantize or stored
    return (quantize_layers(model, quantize) if quantize is not None else model), quantize


def choose_compute(
    model: PaliGemmaForConditionalGeneration,
    dtype: torch.dtype | str,
    device: torch.device | str,
    kernels: str | None = None,
    zero_copy: bool = False,
    retune: bool = False,
    requests: int | None = None,
) -> tuple[torch.dtype, KernelReport]:
    """The compute dtype (a torch dtype, a name, or "auto": the 16-bit dtype measured fastest here) and the
    kernel plan for `model` (on meta is enough); the report says what was chosen and why. Zero-copy weights
    stay views of the file: no kernel that reorders them. `retune` times anew whatever the cache holds; `requests`
    (the requests this load will serve, when known) weighs a layout's reorder at load."""
    rows = defaults.assumed_prompt_tokens(model.cfg.num_image_tokens)
    why = None
    if dtype == "auto":
        largest = max(layer_shapes(model).values(), key=lambda s: s[0] * s[1])
        why = choose_dtype(largest, rows, device, retune, kernels)
        dtype = why.choice
    if isinstance(dtype, str):
        dtype = WEIGHT_DTYPES[dtype]
    report = choose_kernels(model, dtype, device, spec=kernels, prompt_rows=rows, relayout=not zero_copy,
                            retune=retune, requests=requests)  # fmt: skip
    report.details[:0] = [why] if why else []
    return dtype, report
