"""`lowmem-paligemma serve` as a user starts it: a process that listens at once, loads in the background, fails in one
`Error:` line, and stops within seconds of SIGTERM even while it streams (the routes: tests/runtime/test_server.py)."""

from __future__ import annotations

import base64
import io
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from click.testing import CliRunner
from PIL import Image

from lowmem_paligemma.cli import main

httpx = pytest.importorskip("httpx", reason="pip install httpx (the dev extra)")
pytest.importorskip("fastapi", reason="the server needs its extra: pip install -e '.[serve]'")

START_S = 60  # a fresh interpreter imports torch and transformers, then loads the model
STOP_S = 10  # what "exits within seconds" means here
LAUNCH = "from lowmem_paligemma.cli import main; main(prog_name='lowmem-paligemma')"


@contextmanager
def serve_process(*args: str) -> Iterator[tuple[subprocess.Popen, queue.Queue]]:
    """`lowmem-paligemma serve ARGS` in a child process; its stderr lines arrive in the queue as they are written."""
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", *args], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)  # the end of stderr

    threading.Thread(target=read, daemon=True).start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=STOP_S)


def next_line(lines: queue.Queue, pattern: str, seconds: float) -> re.Match:
    deadline, seen = time.monotonic() + seconds, []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no line matching {pattern!r} in {seconds} s; stderr: {seen}")


def test_sigterm_ends_the_streams_and_exits_within_seconds(tiny_pg2_dir):
    with serve_process(str(tiny_pg2_dir), "--port", "0", "--dtype", "float32") as (process, lines):
        url = next_line(lines, r"at (http://127\.0\.0\.1:\d+) ", START_S)[1]
        next_line(lines, r"^ready$", START_S)
        assert httpx.get(url + "/health").json() == {"status": "ok", "model": tiny_pg2_dir.name}
        with httpx.Client(base_url=url, timeout=STOP_S) as client:
            png = io.BytesIO()
            Image.new("RGB", (8, 8), (200, 30, 30)).save(png, format="PNG")
            body = {"model": tiny_pg2_dir.name, "prompt": "caption en", "options": {"num_predict": 4000},
                    "images": [base64.b64encode(png.getvalue()).decode()]}  # fmt: skip
            with client.stream("POST", "/api/generate", json=body) as stream:
                received = stream.iter_lines()  # kept: a dropped iterator would close the connection
                assert not json.loads(next(received))["done"]  # streaming, thousands of tokens to go
                t0 = time.monotonic()
                process.send_signal(signal.SIGTERM)
                rest = [json.loads(line) for line in received if line]
            code = process.wait(timeout=STOP_S)
    assert time.monotonic() - t0 < STOP_S
    assert rest[-1] == {"error": "the server is shutting down"}  # the client is told, not left hanging
    assert code == -signal.SIGTERM  # uvicorn stops cleanly, then lets SIGTERM end the process as SIGTERM does


def test_a_load_that_fails_in_the_background_is_one_error_line(tiny_pg2_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pg2_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:4])  # a header cut short: found while loading, after listening
    with serve_process(str(broken), "--port", "0") as (process, lines):
        next_line(lines, r"^serving broken at http://127\.0\.0\.1:\d+ ", START_S)
        code = process.wait(timeout=START_S)  # not a server left hanging
        rest = []
        while (line := lines.get(timeout=STOP_S)) is not None:
            rest.append(line)
    errors = [line for line in rest if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1 and shard.name in errors[0], rest
    assert not any("Traceback" in line for line in rest), rest


def run(*args: str):
    return CliRunner().invoke(main, ["serve", *map(str, args)])


def test_what_can_be_checked_before_listening_fails_at_once(tiny_pg2_dir, tmp_path):
    missing = run(tmp_path / "nothing")
    assert missing.exit_code == 1 and "Error:" in missing.output and "no such directory" in missing.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run(tiny_pg2_dir, "--port", port)
    assert busy.exit_code == 1 and f"Error: cannot listen on 127.0.0.1:{port}" in busy.output
    bad_vae = tmp_path / "vae.npz"
    bad_vae.write_bytes(b"not an npz")
    vae = run(tiny_pg2_dir, "--vae", bad_vae, "--port", "0")
    assert vae.exit_code == 1 and "Error:" in vae.output and "vae.npz" in vae.output
    parallel = run(tiny_pg2_dir, "--parallel", "0")
    assert parallel.exit_code == 2 and "--parallel" in parallel.output
    body = run(tiny_pg2_dir, "--max-body", "12")
    assert body.exit_code == 2 and "--max-body" in body.output


def test_the_help_names_the_defaults():
    text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "127.0.0.1" in text and "20MB" in text and "LOWMEM_PALIGEMMA_API_KEY" in text
