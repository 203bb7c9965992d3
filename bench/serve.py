"""The server under load: `lowmem-paligemma serve` on a full-size PaliGemma-3B-224, its clients on the same machine.

Full-size synthetic PaliGemma-3B-224 in bfloat16 (bench/common.py) unless --checkpoint names another directory (a
tiny one smoke-tests the script); each mode ("bf16", "int8": --quantize int8) is a fresh `serve` process with
--parallel 8 and a --max-memory budget, its kernel choices already cached (a warm-up request first). 16 random
images of 224 x 224 (what the vision tower sees; a larger image only costs its decoding), "caption en", 20 new
tokens, greedy, streamed (OpenAI flavour, server-sent events) so that each token's arrival is timed:
1. One client at a time, then 8 clients at once over the same 16 images (new image hashes each phase, so no
   cache helps): images per minute, time to first token (p50 / p95), per-token latency (p50 / p95: the gaps between
   a stream's pieces after its first).
2. A follow-up question on an image already sent ("answer en what is in the picture?" after "caption en": the
   vision tower is skipped, the prefix is not, docs/serve.md says why) and the same prompt again (its prompt cache):
   time to first token against the first question's.
3. Overhead: one request through the server (non-streamed, end to end on the client) against `run_prompt` on a
   session loaded in this process with the same options after the server stopped (the CLI's path), same image.
4. The server's peak RSS with its anon / file split (/proc, every 50 ms) against its --max-memory.
Prints the tables and writes docs/results/serve.md (or --out). Nothing else may run meanwhile.

    python -m bench.serve
    python -m bench.serve --checkpoint /tmp/tiny --budget 2GB --out /tmp/serve.md   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import ROOT, ensure_checkpoint
from bench.pagecache import set_page_cache
from bench.report import command, gb, header, md_table, text_table, write

PROMPT, FOLLOW_UP = "caption en", "answer en what is in the picture?"
NEW_TOKENS = 20
IMAGES = 16
CLIENTS = 8
BUDGETS = {"bf16": "8GB", "int8": "5GB"}  # what the 3B needs resident with 8 requests, and some room
CLI = "from lowmem_paligemma.cli import main; main()"
TIMEOUT_S = 1800
MODEL = ["?"]  # the served model's id, read off /health once it is ready


def _png(seed: int, size: int = 224) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _body(image: bytes, prompt: str, stream: bool) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": MODEL[0], "messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS,
            "temperature": 0, "stream": stream}  # fmt: skip


async def _stream(client: httpx.AsyncClient, image: bytes, prompt: str = PROMPT) -> dict:
    """One streamed request: its time to first token, the gaps between later pieces, the whole time."""
    t0 = time.perf_counter()
    arrivals = []
    async with client.stream("POST", "/v1/chat/completions", json=_body(image, prompt, True)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": arrivals[0] - t0, "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])], "total": end - t0}


async def _phase(url: str, images: list[bytes], clients: int) -> dict:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for image in images:
        queue.put_nowait(image)
    results = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await _stream(client, queue.get_nowait()))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    seconds = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": clients, "seconds": seconds, "images_per_min": 60 * len(images) / seconds,
            "ttft": _percentiles(ttft), "per_token": _percentiles(gaps)}  # fmt: skip


def _percentiles(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": statistics.median(values), "p95": values[min(len(values) - 1, int(0.95 * len(values)))]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RssWatch(threading.Thread):
    """The peak RSS of a process with its anon / file split at that reading, sampled every 50 ms (the server is
    another process: read from outside, profiler.current_rss)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak: dict[str, int | None] = {"rss": 0, "anon": None, "file": None}

    def run(self) -> None:
        from lowmem_paligemma.profiling.profiler import current_rss

        while not self.stop.wait(0.05):
            try:
                now = current_rss(self.pid)
            except Exception:  # the process ended
                return
            if now["rss"] > self.peak["rss"]:
                self.peak = now


def run_mode(path: Path, mode: str, budget: str, threads: int) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-c", CLI, "serve", str(path), "--port", str(port), "--parallel", str(CLIENTS),
            "--max-queue", str(2 * IMAGES), "--max-memory", budget, "--dtype", "bfloat16",
            *(["--quantize", "int8"] if mode == "int8" else [])]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    set_page_cache(path, "warm")
    server = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watch = _RssWatch(server.pid)
    watch.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _ready(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve exited or never got ready: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)
        MODEL[0] = httpx.get(url + "/health", timeout=5).json()["model"]
        asyncio.run(_phase(url, [_png(10_000)], 1))  # warm-up: first-call allocations
        serial = asyncio.run(_phase(url, [_png(i) for i in range(IMAGES)], 1))
        together = asyncio.run(_phase(url, [_png(100 + i) for i in range(IMAGES)], CLIENTS))

        async def follow_up() -> dict:
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as client:
                image = _png(5_000)
                first = await _stream(client, image)
                other = await _stream(client, image, FOLLOW_UP)
                again = await _stream(client, image)
            return {"first": first["ttft"], "follow_up": other["ttft"], "same_prompt": again["ttft"]}

        follow = asyncio.run(follow_up())
        t0 = time.perf_counter()
        httpx.post(url + "/v1/chat/completions", json=_body(_png(7_000), PROMPT, False), timeout=TIMEOUT_S)
        served_s = time.perf_counter() - t0
    finally:
        watch.stop.set()
        server.terminate()
        server.wait(60)
    direct_s = _direct(path, mode, threads)
    return {"mode": mode, "budget": budget, "serial": serial, "together": together, "follow": follow,
            "served_s": served_s, "direct_s": direct_s, "peak_rss": watch.peak["rss"],
            "peak_anon": watch.peak["anon"], "peak_file": watch.peak["file"]}  # fmt: skip


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:  # not listening yet
        return False


def _direct(path: Path, mode: str, threads: int) -> float:
    """The CLI's path for the same request: `run_prompt` on a session loaded in a fresh process (encode included)."""
    quantize = "int8" if mode == "int8" else None
    image_path = Path(tempfile.mkdtemp()) / "image.png"
    image_path.write_bytes(_png(7_000))
    code = f"""
import time
from PIL import Image
from lowmem_paligemma import LoadOptions, SamplingOptions, load_session, run_prompt
s = load_session({str(path)!r}, LoadOptions(dtype="bfloat16", quantize={quantize!r}))
image = Image.open({str(image_path)!r}).convert("RGB")
run_prompt(s, s.encode(image), "ocr", SamplingOptions(max_new_tokens=2))  # the same warm-up as the server's
t0 = time.perf_counter()
run_prompt(s, s.encode(image), {PROMPT!r}, SamplingOptions(max_new_tokens={NEW_TOKENS}))
print(time.perf_counter() - t0)
"""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def tables(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = ("mode", "clients", "images/min", "vs 1 client", "TTFT p50 / p95 (s)", "per token p50 / p95 (ms)")
    rows = []
    for r in results:
        for phase in ("serial", "together"):
            p = r[phase]
            ratio = p["images_per_min"] / r["serial"]["images_per_min"]
            rows.append([r["mode"], p["clients"], f"{p['images_per_min']:.2f}", f"{ratio:.2f}x",
                         f"{p['ttft']['p50']:.2f} / {p['ttft']['p95']:.2f}",
                         f"{p['per_token']['p50'] * 1e3:.0f} / {p['per_token']['p95'] * 1e3:.0f}"])  # fmt: skip
    return list(cols), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: the full-size synthetic PaliGemma-3B bf16")
    parser.add_argument("--modes", default="bf16,int8")
    parser.add_argument("--budget", help="--max-memory for every mode (default: per mode, BUDGETS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    path = args.checkpoint or ensure_checkpoint("bf16")
    results = [run_mode(path, m, args.budget or BUDGETS[m], args.threads) for m in args.modes.split(",")]
    cols, rows = tables(results)
    lines = [text_table(cols, rows), ""]
    extra_cols = ("mode", "first question TTFT (s)", "follow-up (other question)", "same prompt again",
                  "one request: server / run_prompt (s)", "overhead",
                  "peak RSS (anon / file) / --max-memory")  # fmt: skip
    extra = []
    for r in results:
        f = r["follow"]
        extra.append([r["mode"], f"{f['first']:.2f}", f"{f['follow_up']:.2f} ({f['follow_up'] / f['first']:.2f}x)",
                      f"{f['same_prompt']:.2f} ({f['same_prompt'] / f['first']:.2f}x)",
                      f"{r['served_s']:.2f} / {r['direct_s']:.2f}", f"{r['served_s'] / r['direct_s'] - 1:+.1%}",
                      f"{gb(r['peak_rss'])} ({gb(r['peak_anon'])} / {gb(r['peak_file'])}) / "
                      f"{r['budget']}"])  # fmt: skip
    lines.append(text_table(extra_cols, extra))
    print("\n".join(lines))
    what = (f"`lowmem-paligemma serve` (--parallel {CLIENTS}) on {path.name}; {IMAGES} random 224 x 224 PNG images, "
            f"'{PROMPT}', {NEW_TOKENS} new tokens, greedy, streamed; clients on the same machine (httpx), "
            f"{args.threads} threads.")  # fmt: skip
    doc = header("Serving", command("bench.serve", sys.argv[1:]), what)
    doc += ["## Throughput and latency", "", *md_table(cols, rows), "", "## Caches, overhead, memory", "",
            *md_table(extra_cols, extra), "", "Raw:", "", "```", json.dumps(results, indent=1), "```"]  # fmt: skip
    out = args.out or ROOT / "docs" / "results" / "serve.md"
    if args.out:
        out.write_text("\n".join(doc) + "\n")
    else:
        write("serve", doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
