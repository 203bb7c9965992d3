"""The README's picture of the web page: `lowmem-paligemma serve` on a tiny synthetic model, Debian's chromium
driven by playwright (as tests/runtime/test_page.py does), one caption asked and answered.

    python -m bench.page_screenshot [--out docs/images/serve-page.png]

The model has random weights: the answer is random words, which is what the picture shows.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.report import ROOT

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "serve-page.png")
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    from lowmem_paligemma.pretrained.synth import tiny_checkpoint

    work = Path(tempfile.mkdtemp())
    model = tiny_checkpoint(work / "paligemma-tiny")
    image = work / "picture.png"
    y, x = np.mgrid[0:300, 0:400]
    Image.fromarray(np.stack([x * 255 // 400, y * 255 // 300, 128 + 0 * x], -1).astype(np.uint8)).save(image)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"LOWMEM_PALIGEMMA_KERNELS": "reference"}
    server = subprocess.Popen([sys.executable, "-c", "from lowmem_paligemma.cli import main; main()", "serve",
                               str(model), "--port", str(port)], env=env)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(url)
            page.set_input_files("#image-input", str(image))
            page.click("#task-caption")
            page.fill("#max-tokens", "12")
            page.click("#run")
            # expect() polls without evaluating a string: the page's Content-Security-Policy forbids eval
            expect(page.locator("#stat-tps")).to_have_text(re.compile(r"tokens/s$"), timeout=60_000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    print(args.out)


if __name__ == "__main__":
    main()
