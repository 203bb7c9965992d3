"""What machine this is: CPU model, and the instruction-set flags that decide kernel speed.

Speed decisions depend on the CPU (an AMX Xeon runs bf16 GEMMs ~3x faster than an AVX512-BF16 EPYC,
and `torch.mv` in bf16 is fast on one and slow on the other), so benchmark documents name the machine
they ran on and the kernel cache is keyed by it. Read from /proc/cpuinfo where it exists, otherwise
from `platform`; never imports torch (the caller passes torch's version and threads when it has them).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The flags that change which kernel is fastest: vector width, bf16/fp16/int8 dot products, AMX tiles.
KERNEL_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "bf16", "i8mm",
)  # fmt: skip
_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CPU:
    model: str  # "AMD EPYC", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", ...
    flags: tuple[str, ...]  # the KERNEL_FLAGS this CPU has, in KERNEL_FLAGS order
    cores: int  # logical CPUs the OS reports

    def describe(self) -> str:
        return f"{self.model}, {self.cores} cores, flags: {' '.join(self.flags) or 'none of note'}"


def _cpuinfo_fields() -> dict[str, str]:
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's entry
            fields[key.strip()] = value.strip()
    return fields


def cpu() -> CPU:
    info = _cpuinfo_fields()
    model = info.get("model name") or info.get("Model") or platform.processor() or platform.machine() or "unknown"
    have = set((info.get("flags") or info.get("Features") or "").split())
    return CPU(model=model, flags=tuple(f for f in KERNEL_FLAGS if f in have), cores=os.cpu_count() or 1)
