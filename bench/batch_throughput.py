"""Batch throughput: images per minute at batch 1, 4 and 8, and `batch --ray` with one worker against the local command.

Full-size synthetic PaliGemma-3B-224 (random weights in the Hub layout, bench/common.py) unless --checkpoint
names another directory (a tiny one smoke-tests the script). 16 random images of assorted sizes, prompt
"caption en", 20 new tokens, greedy, the same thread count everywhere:
1. In process, model loaded once: `batch.run_batch` over all images at each batch size, after a warm-up.
   Reported: images per minute of the whole run (encode + prefill + decode + writing the lines).
2. The phases at batch 1 and the largest batch, model loaded: encoding the images, the prefill, and a
   decode step (median of the steps of one answer). They say where batching can gain: a decode step reads
   every weight once whatever the batch, the encoding and the prefill are compute-bound per image.
3. End to end, each in a fresh process at the largest batch size: `lowmem-paligemma batch` (load + run), then
   `batch --ray --workers 1` on a local Ray cluster started beforehand (a running cluster, as a user would
   have): connect + worker start + load + run. The two alternate --repeat times, each after the checkpoint
   is read into the page cache (both start warm); overhead = median Ray wall time / median local - 1.
   The cluster is started once: Ray Data's helper actors, made by a cluster's first Ray Data job and kept
   (detached), are started inside the first Ray run and exist for the later ones.
Prints the tables and writes docs/results/batch.md (or --out).

    python -m bench.batch_throughput
    python -m bench.batch_throughput --checkpoint /tmp/tiny --out /tmp/batch.md   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import ROOT, ensure_checkpoint
from bench.pagecache import set_page_cache
from bench.report import header

PROMPT = "caption en"
NEW_TOKENS = 20
IMAGES = 16
BATCH_SIZES = (1, 4, 8)
CLI = "from lowmem_paligemma.cli import main; main()"


def write_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (480, 640) if i % 2 else (600, 400)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.jpg", quality=90)


def _env(threads: int) -> dict[str, str]:
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.environ | {"PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": str(threads)}


def in_process(model_dir: Path, images: Path, dtype: str, work: Path) -> list[dict]:
    """Images per minute at each batch size with the model loaded once; the lines of each run for comparison."""
    from lowmem_paligemma import LoadOptions, SamplingOptions, load_session
    from lowmem_paligemma.runtime.batch import BatchJob, list_image_paths, read_records, run_batch

    load, sampling = LoadOptions(dtype=dtype), SamplingOptions(max_new_tokens=NEW_TOKENS)
    session = load_session(model_dir, load)
    job = BatchJob.of(model_dir, PROMPT, sampling, load)
    paths = list_image_paths(str(images))
    run_batch(session, paths[:1], job, SamplingOptions(max_new_tokens=2), work / "warmup.jsonl")
    rows = []
    for size in BATCH_SIZES:
        out = work / f"in-process-{size}.jsonl"
        t0 = time.perf_counter()
        run_batch(session, paths, job, sampling, out, batch_size=size)
        seconds = time.perf_counter() - t0
        records = list(read_records(out))
        rows.append({"run": "in process, model loaded", "batch": size, "seconds": seconds, "records": records})
        print(f"  batch {size}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def phases(model_dir: Path, images: Path, dtype: str) -> list[dict]:
    """Seconds to encode the images, to prefill, and per decode step, at batch 1 and the largest batch."""
    from lowmem_paligemma import LoadOptions, load_session
    from lowmem_paligemma.model.gemma import KVCache
    from lowmem_paligemma.model.generate import decode_step, encode_image, left_pad, prefill
    from lowmem_paligemma.runtime.batch import list_image_paths, prepare_image

    session = load_session(model_dir, LoadOptions(dtype=dtype))
    model, processor = session.model, session.processor
    ids, token_types = processor.prompt_inputs(PROMPT)[:2]
    paths = list_image_paths(str(images))
    rows = []
    for size in (1, max(BATCH_SIZES)):
        pixels = torch.cat([prepare_image(processor, p) for p in paths[:size]])
        encode_image(model, pixels[:1])  # warm-up
        t0 = time.perf_counter()
        features = encode_image(model, pixels)
        encode = time.perf_counter() - t0
        total = ids.shape[1] + NEW_TOKENS
        padded, types, valid, positions, width = left_pad([ids] * size, [token_types] * size, total, 0, model.device)
        cache = KVCache(model.cfg.text, size, total, model.dtype, model.device)
        t0 = time.perf_counter()
        prefill(model, padded[:, :width], types[:, :width], features, cache, valid[:, :width], positions[:, :width])
        fill = time.perf_counter() - t0
        steps = []
        for i in range(NEW_TOKENS - 1):  # the decode steps of one answer (the prefill gives the first token)
            t0 = time.perf_counter()
            decode_step(model, padded, types, width + i, cache, valid, positions)
            steps.append(time.perf_counter() - t0)
        rows.append({"batch": size, "encode": encode, "prefill": fill, "step": float(np.median(steps))})
        print(f"  phases at batch {size}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def phase_lines(rows: list[dict]) -> list[str]:
    """The phases per image, and what batching could reach if a batched decode step cost batch 1's."""
    one, big = rows[0], rows[-1]
    steps = NEW_TOKENS - 1
    lines = ["| batch | encode, s / image | prefill, s / image | decode step, ms | "
             f"decode, s / image ({steps} steps) | s / image |", "|---|---|---|---|---|---|"]  # fmt: skip
    per_image = {}
    for r in rows:
        b = r["batch"]
        decode = steps * r["step"] / b
        per_image[b] = r["encode"] / b + r["prefill"] / b + decode
        lines.append(f"| {b} | {r['encode'] / b:.2f} | {r['prefill'] / b:.2f} | {1000 * r['step']:.0f} | {decode:.2f} "
                     f"| {per_image[b]:.2f} |")  # fmt: skip
    compute = (big["encode"] + big["prefill"]) / big["batch"]
    ideal = per_image[1] / (compute + steps * one["step"] / big["batch"])
    lines += ["", f"A decode step at batch {big['batch']} costs {big['step'] / one['step']:.2f}x one at batch 1. "
              f"Sum of the phases: {per_image[1] / per_image[big['batch']]:.2f}x the images / min of batch 1; "
              f"with a batched step costing exactly batch 1's it would be {ideal:.2f}x (the encoding and the "
              "prefill are the same work per image, batched or not)."]  # fmt: skip
    return lines


def end_to_end(
    model_dir: Path, images: Path, dtype: str, work: Path, threads: int, batch: int, repeat: int
) -> list[dict]:
    """The local command and the Ray command, each a fresh process timed from start to exit, alternating."""
    common = [str(model_dir), str(images), PROMPT, "--dtype", dtype, "--max-new-tokens", str(NEW_TOKENS),
              "--batch-size", str(batch), "--device", "cpu"]  # fmt: skip
    runs: dict[str, list[dict]] = {}

    def timed(name: str, extra: list[str], out: Path) -> None:
        from lowmem_paligemma.runtime.batch import read_records

        out.unlink(missing_ok=True)
        set_page_cache(model_dir, "warm")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CLI, "batch", *common, "--out", str(out), *extra],
                              env=_env(threads), capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        runs.setdefault(name, []).append({"seconds": seconds, "records": list(read_records(out))})
        print(f"  {name}: {seconds:.1f} s", file=sys.stderr, flush=True)

    local_name, ray_name = "local command (load + run)", "Ray, 1 worker (connect + load + run)"
    try:
        import ray
    except ImportError:
        ray = None
        print("  Ray is not installed (pip install '.[ray]'): no Ray row", file=sys.stderr)
    if ray is not None:
        # A cluster owned by this process (it ends with ray.shutdown), started before the clock, as a user's
        # would be; its workers inherit this environment, so they import this checkout.
        os.environ.update(_env(threads))
        ray.init(num_cpus=threads, object_store_memory=500 << 20, include_dashboard=False)
    try:
        for _ in range(repeat):
            timed(local_name, [], work / "local.jsonl")
            if ray is not None:
                address = ray.get_runtime_context().gcs_address
                extra = ["--ray", "--ray-address", address, "--workers", "1", "--worker-cpus", str(threads)]
                timed(ray_name, extra, work / "ray.jsonl")
    finally:
        if ray is not None:
            ray.shutdown()
    return [
        {"run": name, "batch": batch, "seconds": float(np.median([r["seconds"] for r in these])),
         "each": [r["seconds"] for r in these], "records": these[-1]["records"]}
        for name, these in runs.items()
    ]  # fmt: skip


def _same_outputs(row: dict, reference: dict) -> str:
    """How many images got the reference run's output (bf16 rounding may differ across batch shapes)."""
    want = {r["path"]: r.get("output") for r in reference["records"]}
    got = {r["path"]: r.get("output") for r in row["records"]}
    same = sum(got.get(p) == o for p, o in want.items())
    return f"{same}/{len(want)}"


def table(rows: list[dict]) -> list[str]:
    base = rows[0]
    local = next((r for r in rows if r["run"].startswith("local")), None)
    lines = ["| run | batch | seconds | images / min | vs batch 1 | vs local command | outputs as batch 1 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        per_min = 60 * len(r["records"]) / r["seconds"]
        speedup = f"{base['seconds'] / r['seconds']:.2f}x" if r["run"] == base["run"] else "-"
        vs_local = f"{r['seconds'] / local['seconds'] - 1:+.1%}" if local and r["run"].startswith("Ray") else "-"
        seconds = f"{r['seconds']:.1f}"
        if len(r.get("each", [])) > 1:
            seconds += " (median of " + ", ".join(f"{s:.1f}" for s in r["each"]) + ")"
        lines.append(f"| {r['run']} | {r['batch']} | {seconds} | {per_min:.2f} | {speedup} | {vs_local} "
                     f"| {_same_outputs(r, base)} |")  # fmt: skip
    return lines


def targets(rows: list[dict]) -> list[str]:
    by = {(r["run"], r["batch"]): r for r in rows}
    one, eight = by.get(("in process, model loaded", 1)), by.get(("in process, model loaded", max(BATCH_SIZES)))
    local = next((r for r in rows if r["run"].startswith("local")), None)
    ray = next((r for r in rows if r["run"].startswith("Ray")), None)
    verdict = lambda ok: "met" if ok else "**not met**"
    lines = ["| target | this run | verdict |", "|---|---|---|"]
    if one and eight:
        ratio = one["seconds"] / eight["seconds"]
        lines.append(f"| batch {max(BATCH_SIZES)} >= 2x the images / min of batch 1 | {ratio:.2f}x "
                     f"| {verdict(ratio >= 2)} |")  # fmt: skip
    if local and ray:
        overhead = ray["seconds"] / local["seconds"] - 1
        lines.append(f"| Ray, 1 worker, <= 10% over the local command | {overhead:+.1%} | {verdict(overhead <= 0.1)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="model directory (default: full-size synthetic PaliGemma-3B)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in every run")
    ap.add_argument("--repeat", type=int, default=3, help="end-to-end runs of each command (median reported)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "batch.md")
    args = ap.parse_args()
    model_dir = args.checkpoint or ensure_checkpoint("bf16")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    try:
        images = work / "images"
        images.mkdir()
        write_images(images, IMAGES)
        print(f"in process, {model_dir.name}, {args.dtype}, {args.threads} threads:", file=sys.stderr, flush=True)
        rows = in_process(model_dir, images, args.dtype, work)
        steps = phase_lines(phases(model_dir, images, args.dtype))
        print("end to end:", file=sys.stderr, flush=True)
        rows += end_to_end(model_dir, images, args.dtype, work, args.threads, max(BATCH_SIZES), args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = table(rows)
    print("\n".join([*lines, "", *steps]))
    command = "python -m bench.batch_throughput" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
    command += f" --repeat {args.repeat}" if args.repeat != 3 else ""
    what = (
        f"{args.threads} threads, {args.dtype} weights of `{model_dir.name}`. {IMAGES} random images, prompt "
        f"`{PROMPT}`, {NEW_TOKENS} new tokens, greedy. bench/batch_throughput.py says what each row times; "
        "docs/batch.md explains batching and the Ray path."
    )
    doc = header("Batch throughput", command, what) + [
        *lines,
        "",
        "## Where the time goes (model loaded)",
        "",
        *steps,
        "",
        "## Targets",
        "",
        *targets(rows),
        "",
        "Tokens per image: " + json.dumps(sorted({r.get("tokens") for r in rows[0]["records"]} - {None})) + ".",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(doc))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
