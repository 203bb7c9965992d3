"""The measurements behind the kernel and dtype choices, against this machine's ceilings measured in the same run.

    python -m bench.kernels

- Ceilings: the DRAM read rate (what a decode step, which streams every weight once, cannot beat: the larger of
  a uint8 max-reduction by torch and our AVX-512 sum, formats/native.cpp `read_bytes`, over 2 GB), and the GEMM
  rates for a 256-row prefill on PaliGemma-3B's MLP shape: float32 (MKL), bfloat16 (oneDNN), int8 x int8
  (`torch._int_mm`, VNNI / AMX where the CPU has them);
- every candidate kernel of every weight format (lowmem_paligemma/formats/) on that shape (16384 x 2048), one row
  (decode) and 256 rows (prefill), timed exactly as the runtime's chooser times them (formats/chooser.py: the
  fastest of interleaved rounds), as GB/s of weights read and % of the DRAM ceiling, or GFLOP/s; and the reorder
  into a layout kernel's layout (dense `packed`), what a load pays per layer for choosing it;
- our decode kernels on a layer small enough to stay in the caches (CACHED_SHAPE): their arithmetic's rate in
  weights/s; and on SHAPE streamed from DRAM through copies of the layer (STREAM_BYTES);
- cold disk reads of a checkpoint shard with 1 and 4 reads in flight (the loader keeps 4).
Each table row is the median of REPEATS measurements taken in turn, since this machine's memory rate moves from
second to second. Writes docs/results/kernels.md.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import ensure_checkpoint
from bench.report import command, header, md_table, set_threads, text_table, write

THREADS = 2
SHAPE = (16384, 2048)  # PaliGemma-3B gate_proj / up_proj (out, in)
CACHED_SHAPE = (512, 2048)  # a layer that stays in the caches (1 MB in int8): the decode kernels' arithmetic rate
STREAM_BYTES = 512 << 20  # copies of SHAPE's layer passing this many bytes: no last-level cache holds them
PREFILL_ROWS = 256
REPEATS = 3


def cold_read(path: Path, readers: int, chunk: int = 16 << 20) -> float:
    """Seconds to read `path` with `readers` threads, its pages dropped from the page cache first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.path.getsize(path)
        offsets = list(range(0, size, chunk))

        def reader(i: int) -> None:
            buf = memoryview(bytearray(chunk))
            for off in offsets[i::readers]:
                os.preadv(fd, [buf[: min(chunk, size - off)]], off)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(reader, range(readers)))
        return time.perf_counter() - t0
    finally:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def dram_read_rate() -> float:
    """Bytes/s of one pass over 2 GB: the larger of torch's uint8 max-reduction and our AVX-512 sum (the native
    kernels where they built). Shared by bench/generate_speed.py."""
    import torch

    from lowmem_paligemma.formats import native

    raw = torch.ones(2_000_000_000, dtype=torch.uint8)
    passes = [raw.max]
    if (nk := native.kernels()) is not None:
        passes.append(lambda: nk.read_bytes(raw))
    best = 0.0
    for one in passes:
        one()
        t0 = time.perf_counter()
        for _ in range(3):
            one()
        best = max(best, 3 * raw.numel() / (time.perf_counter() - t0))
    return best


def gemm_rates() -> dict[str, float]:
    """FLOP/s of a 256-row prefill GEMM on SHAPE: float32, bfloat16 and int8 x int8 -> int32."""
    import torch

    from lowmem_paligemma.formats.chooser import time_candidates

    o, i = SHAPE
    g = torch.Generator().manual_seed(0)
    w32, x32 = torch.randn(o, i, generator=g), torch.randn(PREFILL_ROWS, i, generator=g)
    w16, x16 = w32.bfloat16(), x32.bfloat16()
    w8, x8 = w32.mul(20).to(torch.int8), x32.mul(20).to(torch.int8)
    calls = {"float32 GEMM": lambda: torch.nn.functional.linear(x32, w32),
             "bfloat16 GEMM": lambda: torch.nn.functional.linear(x16, w16),
             "int8 GEMM (_int_mm)": lambda: torch._int_mm(x8, w8.t())}  # fmt: skip
    with torch.inference_mode():
        seconds = time_candidates(calls).seconds
    return {name: 2 * PREFILL_ROWS * o * i / s for name, s in seconds.items()}


def candidate_rows(dram: float) -> list[list[str]]:
    import torch

    from lowmem_paligemma.formats import registry
    from lowmem_paligemma.formats.chooser import _measure

    o, i = SHAPE
    rows = []
    for fmt_name, dtype in (("dense", torch.bfloat16), ("dense", torch.float16), ("int8", torch.bfloat16),
                            ("int4", torch.bfloat16)):  # fmt: skip
        fmt = registry.get(fmt_name)
        weight_bytes = fmt.weight_bytes(o, i, dtype)
        for key, s in sorted(_measure(fmt, SHAPE, dtype).seconds.items()):
            phase, name = key.split()
            if phase == "decode":
                rate = (f"{weight_bytes / s / 1e9:.1f} GB/s ({weight_bytes / s / dram:.0%} of DRAM), "
                        f"{o * i / s / 1e9:.1f} G weights/s")  # fmt: skip
            elif phase == "relayout":  # the reorder into the kernel's layout, once per layer at load
                rate = f"{weight_bytes / s / 1e9:.1f} GB/s reordered"
            else:
                rate = f"{2 * PREFILL_ROWS * o * i / s / 1e9:.0f} GFLOP/s"
            rows.append([f"{fmt_name} {str(dtype).removeprefix('torch.')} {phase}", name, f"{s * 1e3:.2f}", rate])
    return rows


def native_rows() -> list[list[str]]:
    """Our decode kernels twice: on CACHED_SHAPE warm in the caches (the rate their arithmetic allows, in
    weights/s), and on SHAPE streamed from DRAM through copies that together pass STREAM_BYTES (a 16384 x 2048
    int4 layer, 17 MB, stays in a 32 MB L3 otherwise, as it does in the candidate rows above): which of the two
    holds a format's decode."""
    import torch

    from lowmem_paligemma.formats import native
    from lowmem_paligemma.formats.chooser import time_candidates
    from lowmem_paligemma.formats.int4 import quantize_int4_packed
    from lowmem_paligemma.formats.int8 import quantize_int8

    if (nk := native.kernels()) is None:
        return []
    rows = []
    for (o, i), streamed in ((CACHED_SHAPE, False), (SHAPE, True)):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(o, i, generator=g)
        x = torch.randn(1, i, generator=g).bfloat16()
        layers = {"dense bfloat16": (w.bfloat16(),), "int8 bfloat16": quantize_int8(w, torch.bfloat16),
                  "int4 bfloat16": quantize_int4_packed(w, torch.bfloat16)}  # fmt: skip
        del w
        kernels = {"dense bfloat16": [("native", lambda x, t: nk.gemv_dense(x, *t))],
                   "int8 bfloat16": [("native", lambda x, t: nk.gemv_int8(x, *t))],
                   "int4 bfloat16": [("native", lambda x, t: nk.gemv_int4(x, *t, 128))]}  # fmt: skip
        if dot := nk.int8_dot():  # "vnni" or "maddubs": the integer decode (native_dot.cpp)
            kernels["int4 bfloat16"].append((dot, lambda x, t: nk.gemv_int4_dot(x, *t, 128)))
        if dot == "maddubs":  # AVX2's int8 one too
            kernels["int8 bfloat16"].append((dot, lambda x, t: nk.gemv_int8_dot(x, *t)))
        for name, tensors in layers.items():
            size = sum(t.numel() * t.element_size() for t in tensors)
            copies = [tensors] + [
                tuple(t.clone() for t in tensors) for _ in range(STREAM_BYTES // size if streamed else 0)
            ]
            calls = {}
            for kernel, call in kernels[name]:
                turn = iter(range(1 << 62))
                calls[kernel] = lambda call=call, turn=turn, x=x, c=copies: call(x, c[next(turn) % len(c)])
            with torch.inference_mode():
                seconds = time_candidates(calls).seconds
            where = f"{len(copies)} copies streamed from DRAM" if streamed else "in the caches"
            for kernel, sec in seconds.items():
                rate = f"{o * i / sec / 1e9:.1f} G weights/s" + (f", {size / sec / 1e9:.1f} GB/s" if streamed else "")
                rows.append([f"{name} decode, {o} x {i}, {where}", kernel, f"{sec * 1e3:.3f}", rate])
            del copies, calls
    return rows


def main() -> None:
    set_threads(THREADS)
    cmd = command("bench.kernels", [])
    drams = [dram_read_rate() for _ in range(REPEATS)]
    dram = statistics.median(drams)
    gemm = [gemm_rates() for _ in range(REPEATS)]
    rows = [["DRAM read ceiling (2 GB, median of 3)", "-", "-",
             f"{dram / 1e9:.1f} GB/s (runs {', '.join(f'{d / 1e9:.1f}' for d in drams)})"]]  # fmt: skip
    for name in gemm[0]:
        rate = statistics.median(g[name] for g in gemm)
        rows.append([f"{name} ceiling, {PREFILL_ROWS} x {SHAPE[1]} @ {SHAPE[1]} x {SHAPE[0]}", "-", "-",
                     f"{rate / 1e9:.0f} GFLOP/s"])  # fmt: skip
    rows += candidate_rows(dram) + native_rows()
    shard = max(ensure_checkpoint("bf16").glob("*.safetensors"), key=lambda f: f.stat().st_size)
    size = shard.stat().st_size
    for readers in (1, 4):
        s = statistics.median(cold_read(shard, readers) for _ in range(REPEATS))
        rows.append([f"cold read of a {size / 1e9:.1f} GB shard", f"{readers} in flight", f"{s * 1e3:.0f}",
                     f"{size / s / 1e9:.2f} GB/s"])  # fmt: skip
    cols = ("measurement", "kernel", "fastest ms", "rate")
    print(text_table(cols, rows))
    what = (
        f"Shapes: PaliGemma-3B's MLP weight {SHAPE[0]} x {SHAPE[1]}; decode = 1 row, prefill = {PREFILL_ROWS} "
        f"rows; {THREADS} threads; the chooser's timing (a warm-up, then the fastest of interleaved rounds). "
        "Decode rates count the bytes the format holds for the layer (int8 and int4 with their scales)."
    )
    write("kernels", header("Kernel measurements", cmd, what) + md_table(cols, rows))


if __name__ == "__main__":
    main()
