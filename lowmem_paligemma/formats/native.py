"""Our own kernels (native.cpp; native_attention.cpp; native_decode.cpp; native_dot*.cpp; native_vnni*.cpp; native.h,
what they share), built for the running machine, where the libraries' kernels stop short.

On the CPUs this runs on, torch's decode-step products can leave DRAM bandwidth unused (docs/results/kernels.md
has every candidate's rate on the machine that wrote it: `F.linear` on bf16 and `_weight_int8pack_mm` well below
the read rate there), and a decode step is nothing but streaming the weights. native.cpp reads each weight once
in its stored format, 16 lanes at a time (native.h: AVX-512, or AVX2 where the CPU has no AVX-512); the chooser
(chooser.py) times these kernels beside torch's and keeps whichever is faster on this machine. It also widens and
unpacks the "upcast" prefills' float32 weights, and quantizes rows while a checkpoint streams (the same bits as the
torch rules).

Built once per machine with torch.utils.cpp_extension (g++ and ninja) into the cache directory, keyed by the
source, torch's version and the CPU flags; `make install` builds it ahead (`native.build()`).
Two builds (`BUILDS`): AVX-512F/BW, with the integer kernels of native_vnni*.cpp (their `has_vnni()` says whether
the CPU has VNNI); else AVX2 with FMA and F16C, the same kernels on two 256-bit registers a vector, without
native_vnni*.cpp (`has_vnni()` False) and with native_dot_gemm.cpp's AVX2 integer prefills in their place (both
builds compile it: plain AVX2, so tests run it anywhere); `int8_dot()` names the byte dot product the integer
decodes and the formats' "maddubs" candidates use ("vnni", "maddubs" on AVX2, "" for none). Never required:
without a compiler, or on a CPU with neither, `kernels()` is None and the formats offer torch's kernels only.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..machine import cpu

SOURCE_DIR = Path(__file__).parent
# compiled: the module (native.cpp defines it), then the others (native_vnni*.cpp, native_amx_gemm.cpp: AVX-512 builds
# only, their kernels where the CPU has VNNI, AMX)
SOURCES = (
    "native.cpp", "native_attention.cpp", "native_decode.cpp", "native_dot.cpp", "native_dot_gemm.cpp",
    "native_vnni.cpp", "native_vnni_gemm.cpp", "native_amx_gemm.cpp",
)  # fmt: skip
HEADERS = ("native.h", "native_igemm.h")  # what they share: part of the build's key
ENV_DISABLE = "LOWMEM_PALIGEMMA_NO_NATIVE"  # set: torch's kernels only (an ablation, or a broken toolchain)
# -fopenmp compiles at::parallel_for's OpenMP regions in (without it they run on one thread); nothing is added at link
# time, so the regions run on torch's own OpenMP runtime, found through libtorch's dependencies: no second thread pool.
# -ffp-contract=off: a product and a sum written apart stay two roundings, as in torch's ops (native_decode.cpp's rotary
# gives their bits); the kernels' fused multiply-adds are written as such.
COMMON_CFLAGS = ("-O3", "-march=native", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off")


@dataclass(frozen=True)
class Build:
    """One way to build the kernels: the CPU flags it needs, its sources and its compiler flags."""

    isa: str
    needs: tuple[str, ...]
    sources: tuple[str, ...]
    cflags: tuple[str, ...]


# The first whose flags the CPU has is built (native.h picks its vector layer from the compiler's flags).
BUILDS = (
    Build("avx512", ("avx512f", "avx512bw"), SOURCES, ("-mavx512f", "-mavx512bw", *COMMON_CFLAGS)),
    Build("avx2", ("avx2", "fma", "f16c"), SOURCES[:5], ("-mavx2", *COMMON_CFLAGS)),
)


def chosen() -> Build | None:
    """The build for this CPU (None: neither, or kernels disabled by ENV_DISABLE, or not Linux)."""
    if os.environ.get(ENV_DISABLE) or sys.platform != "linux":
        return None
    flags = cpu().flags
    return next((b for b in BUILDS if all(f in flags for f in b.needs)), None)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/lowmem_paligemma/native/<key> (not the kernel choices' directory: tests point that one at
    temporary directories, and a build takes a minute). The key holds the source's path too: torch's build files
    name the source by path, so two checkouts sharing one directory would rebuild it each time the other used it."""
    c, b = cpu(), chosen() or BUILDS[0]
    files = "|".join(f"{p.resolve()}|{p.read_bytes()!r}" for p in _files(SOURCES + HEADERS))
    text = f"{files}|{b}|{torch.__version__}|{c.model}|{c.flags}"
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowmem_paligemma" / "native" / key


def _files(names: tuple[str, ...]) -> list[Path]:
    return [SOURCE_DIR / n for n in names]


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled module (built now if needed), or None where it cannot be: see the module docstring."""
    b = chosen()
    if b is None:
        return None
    from torch.utils import cpp_extension

    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    # The ninja this package depends on (installed beside the interpreter) before any other on PATH: ninja versions
    # keep their build logs differently, so a build made by one looks stale to another and is redone (a minute
    # inside a load) whenever the PATH changes, e.g. `make install` without the virtualenv activated, then a shell
    # with it.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        return cpp_extension.load(
            name=f"lowmem_paligemma_native_{build.name}", sources=[str(p) for p in _files(b.sources)],
            build_directory=str(build), extra_cflags=list(b.cflags), verbose=False,
        )  # fmt: skip
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, no ninja, a toolchain that fails
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"lowmem_paligemma's native kernels could not be built ({first}); using torch's", stacklevel=2)
        return None
    finally:
        os.environ["PATH"] = path


def build() -> None:
    """`make install`: build ahead, and say what happened."""
    module = kernels()
    where = f"built for {chosen().isa} in {cache_dir()}" if module else "not available on this machine"
    print(f"native kernels: {where}")
