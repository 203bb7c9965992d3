"""How to load a model: `LoadOptions`, validated when made, so every front end (CLI, server, benches) gets the same
checks and messages and only formats them.

A bad value raises OptionError naming the field (`.option`); values are normalised on the way in (a dtype as a
torch dtype or its name, a memory budget as bytes or a size such as "12GB", a sums file as a path). What depends
on the machine (is CUDA there?) is checked when the device is resolved (`resolved_device`), at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import defaults
from ..checkpoint.safetensors_io import WEIGHT_DTYPES, dtype_name
from ..errors import OptionError
from ..formats import registry
from ..formats.chooser import parse_spec
from ..units import parse_size

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class LoadOptions:
    dtype: str = defaults.DTYPE  # "auto" or a key of WEIGHT_DTYPES (a torch dtype is taken and named)
    device: str = defaults.DEVICE  # auto / cpu / cuda / cuda:N / mps
    quantize: str | None = None  # None or a quantizing weight format (formats/registry.py: int8, int4, ...)
    kernels: str | None = None  # None: measured (formats/chooser.py); or a spec such as "int8=int8pack/dequant"
    zero_copy: bool = False  # map the shards instead of copying (CPU, checkpoint stored as loaded)
    preflight: bool = True  # refuse a load that would not fit in the memory available now
    max_memory: int | None = None  # peak RSS budget in bytes ("12GB" is taken): layers that do not fit are streamed
    prefetch: bool = True  # read the next streamed layer while one computes (False: the ablation)
    verify: bool | Path = False  # check shard checksums first: True the Hub's records, a path a sums file
    # The requests this load will serve, when known (the CLI's generate: 1): the kernel choice then charges a layout's
    # reorder at load (oneDNN's packed bf16: seconds for a 3B model) to them; None: many (a server, a library user).
    requests: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        if isinstance(self.dtype, torch.dtype):
            set_("dtype", dtype_name(self.dtype))
        if self.dtype != "auto" and self.dtype not in WEIGHT_DTYPES:
            raise OptionError(f"dtype {self.dtype!r} is not auto or one of {', '.join(WEIGHT_DTYPES)}", "dtype")
        if isinstance(self.device, torch.device):
            set_("device", str(self.device))
        if not isinstance(self.device, str) or self.device.partition(":")[0] not in DEVICES:
            raise OptionError(f"device {self.device!r} is not one of {', '.join(DEVICES)}", "device")
        modes = registry.quantize_modes()
        if self.quantize is not None and self.quantize not in modes:
            raise OptionError(f"quantize must be one of {', '.join(modes)}, got {self.quantize!r}", "quantize")
        if self.kernels is not None:
            _reraise(lambda: parse_spec(self.kernels), "kernels")
        if isinstance(self.max_memory, str):
            set_("max_memory", _reraise(lambda: parse_size(self.max_memory), "max_memory"))
        if self.requests is not None and (isinstance(self.requests, bool) or not isinstance(self.requests, int)
                                          or self.requests < 1):  # fmt: skip
            raise OptionError(f"requests {self.requests!r} is not a positive number of requests", "requests")
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or not isinstance(self.max_memory, int)
                                            or self.max_memory <= 0):  # fmt: skip
            raise OptionError(f"max_memory {self.max_memory!r} is not a positive size such as 12GB", "max_memory")
        if isinstance(self.verify, str):
            set_("verify", Path(self.verify))
        if isinstance(self.verify, Path) and not self.verify.is_file():
            raise OptionError(f"{self.verify}: no such sums file", "verify")
        for name in ("zero_copy", "preflight", "prefetch"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be true or false, got {getattr(self, name)!r}", name)
        if self.zero_copy and self.max_memory is not None:
            raise OptionError("zero_copy maps every weight into the process; it cannot keep to max_memory", "zero_copy")
        if self.device.partition(":")[0] in ("cuda", "mps") and self.max_memory is not None:  # CPU code
            raise OptionError("max_memory streams layers into CPU memory; it runs on the CPU only", "max_memory")

    def resolved_device(self) -> torch.device:
        """The device to load on: "auto" is cuda when available, else cpu; an unavailable one is an OptionError,
        as is a memory budget on a GPU (budgets stream layers into CPU memory)."""
        kind = self.device.partition(":")[0]
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        elif kind == "cuda" and not torch.cuda.is_available():
            raise OptionError("CUDA is not available (no GPU, or a CPU-only torch build)", "device")
        elif kind == "mps" and not torch.backends.mps.is_available():
            raise OptionError("MPS (Apple GPU) is not available on this machine", "device")
        device = torch.device(self.device if self.device.partition(":")[0] != "auto" else kind)
        if device.type != "cpu" and self.max_memory is not None:  # "auto" found a GPU
            raise OptionError("max_memory streams layers into CPU memory; it runs on the CPU only", "max_memory")
        return device


def _reraise(fn, option: str):
    """fn(), with a ValueError or OptionError re-raised as an OptionError naming `option`."""
    try:
        return fn()
    except ValueError as e:
        raise OptionError(str(e), option) from None
