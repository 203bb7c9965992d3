"""The measurements behind the kernel and dtype choices, on this machine (`make bench` runs it).

    python -m bench.kernels

- DRAM read rate: the ceiling of a decode step, which streams every weight once;
- every candidate kernel of every weight format (lowmem_paligemma/formats/dense.py) on PaliGemma-3B's MLP shape
  (16384 x 2048), one row (decode) and 256 rows (prefill), timed exactly as the runtime's chooser times them
  (lowmem_paligemma/formats/chooser.py), reported as GB/s of weights read and GFLOP/s;
- cold disk reads of a checkpoint shard with 1 and 4 reads in flight (the loader keeps 4).
Writes docs/results/kernels.md.
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


def main() -> None:
    import torch

    from bench.generate_speed import dram_read_rate
    from lowmem_paligemma.formats import chooser as kernels
    from lowmem_paligemma.formats import registry

    set_threads(THREADS)
    cmd = command("bench.kernels", [])
    rows = []
    dram = dram_read_rate()
    rows.append(["DRAM read (max of 4 GB uint8)", "-", "-", f"{dram / 1e9:.1f} GB/s"])
    o, i = SHAPE
    for fmt, dtype, bytes_per_weight in (("dense", torch.bfloat16, 2), ("dense", torch.float16, 2),
                                         ("int8", torch.bfloat16, 1), ("int4", torch.bfloat16, 0.5)):  # fmt: skip
        for key, s in sorted(kernels._measure(registry.get(fmt), SHAPE, dtype).seconds.items()):
            phase, name = key.split()
            rate = (f"{o * i * bytes_per_weight / s / 1e9:.1f} GB/s" if phase == "decode"
                    else f"{2 * kernels.PREFILL_ROWS * o * i / s / 1e9:.0f} GFLOP/s")  # fmt: skip
            rows.append([f"{fmt} {str(dtype).removeprefix('torch.')} {phase}", name, f"{s * 1e3:.2f}", rate])
    shard = max(ensure_checkpoint("bf16").glob("*.safetensors"), key=lambda f: f.stat().st_size)
    size = shard.stat().st_size
    for readers in (1, 4):
        s = statistics.median(cold_read(shard, readers) for _ in range(3))
        rows.append([f"cold read of a {size / 1e9:.1f} GB shard", f"{readers} in flight", f"{s * 1e3:.0f}",
                     f"{size / s / 1e9:.2f} GB/s"])  # fmt: skip
    cols = ("measurement", "kernel", "median ms", "rate")
    print(text_table(cols, rows))
    what = (f"Shapes: PaliGemma-3B's MLP weight {o} x {i}; decode = 1 row, prefill = {kernels.PREFILL_ROWS} rows; "
            f"{THREADS} threads; the chooser's timing (a warm-up, then the median of up to 5 runs).")  # fmt: skip
    write("kernels", header("Kernel measurements", cmd, what) + md_table(cols, rows))


if __name__ == "__main__":
    main()
