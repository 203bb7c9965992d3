"""The built-in web page (runtime/server/static/index.html) driven in a real headless Chromium against the real server
(tests/runtime/conftest.py: `served`, the tiny PaliGemma 2; `forced` makes it answer with a known segmentation).

Needs Debian's chromium (`apt-get install chromium`) and the playwright Python package, used only as a driver
for that browser (`playwright install` is never run).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import MODEL_ID
from PIL import Image, ImageDraw

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
pytest.importorskip("fastapi", reason="the server needs its extra: pip install -e '.[serve]'")
parser = pytest.importorskip("prometheus_client.parser")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("chromium is not installed: apt-get install chromium", allow_module_level=True)
expect = sync_api.expect

from lowmem_paligemma.runtime.server import engine as engine_module  # noqa: E402

# Without the background-networking flags Chromium keeps calling Google services, which the sandbox blocks.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IMAGE_SIZE = (960, 720)
# A segmentation answer as PaliGemma writes it: y0 x0 y1 x1 in 1/1024 of the image, 16 mask codes, the label.
ANSWER = "<loc0128><loc0160><loc0768><loc0640>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " cat"
BOX = (150, 90, 600, 540)  # x = 160 / 1024 * 960, y = 128 / 1024 * 720, ...: pixels of the 960 x 720 image
MASK_INSET = 8  # of the VAE stub's 64 x 64 cells, on each side: the mask is a rectangle inside the box


class RectangleVAE:
    """Stands in for vae-oid.npz: every object's mask is the box less MASK_INSET / 64 of it on each side, so the page's
    mask is a clean rectangle that can be told apart from the box (the server's own decoding is tested in
    test_server.py)."""

    def decode_masks(self, codes: list[list[int]]) -> torch.Tensor:
        mask = -torch.ones(len(codes), 64, 64)  # -1: outside once scaled as clip(m * 0.5 + 0.5, 0, 1)
        mask[:, MASK_INSET:-MASK_INSET, MASK_INSET:-MASK_INSET] = 1.0
        return mask


def mask_rectangle() -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = BOX
    dx, dy = (x1 - x0) * MASK_INSET / 64, (y1 - y0) * MASK_INSET / 64
    return x0 + dx, y0 + dy, x1 - dx, y1 - dy


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: sync_api.Browser, served) -> Iterator[sync_api.Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(10_000)  # every click, fill and wait gives up after 10 s
    yield page
    context.close()


def chat_requests(served) -> float:
    """Chat completions the server has answered so far, any status (its /metrics)."""
    import httpx

    families = parser.text_string_to_metric_families(httpx.get(served.url + "/metrics", timeout=10).text)
    chats = [s for family in families for s in family.samples if s.name == "lowmem_http_requests_total"]
    return sum(s.value for s in chats if s.labels["endpoint"] == "/v1/chat/completions")


def sent_chats(page: sync_api.Page) -> list[sync_api.Request]:
    sent: list[sync_api.Request] = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat/completions") else None)
    return sent


def open_page(page: sync_api.Page, served) -> None:
    page.goto(served.url + "/")
    expect(page.locator("#server-status")).to_have_text(f"model: {MODEL_ID}")


def upload_image(page: sync_api.Page, tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    image = Image.new("RGB", IMAGE_SIZE, (120, 160, 110))
    ImageDraw.Draw(image).ellipse(BOX, fill=(200, 150, 90))
    image.save(path)
    page.set_input_files("#image-input", path)
    expect(page.locator("#image")).to_be_visible()


def overlay_rgba(page: sync_api.Page, x: float, y: float) -> list[int]:
    """The overlay canvas pixel over (x, y) in pixels of the sent image, wherever the page scaled it to."""
    return page.evaluate(
        """([x, y]) => {
            const canvas = document.getElementById("overlay");
            const image = document.getElementById("image");
            const px = Math.floor(x * canvas.width / image.naturalWidth);
            const py = Math.floor(y * canvas.height / image.naturalHeight);
            return Array.from(canvas.getContext("2d").getImageData(px, py, 1, 1).data);
        }""",
        [x, y],
    )


def test_segment_streams_answer_and_draws_box_and_mask(served, forced, page, tmp_path, monkeypatch):
    generated = len(forced(ANSWER))
    monkeypatch.setattr(served.state, "vae", RectangleVAE())
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    sent = sent_chats(page)
    open_page(page, served)
    upload_image(page, tmp_path)
    page.click("#task-segment")
    expect(page.locator("#prompt")).to_have_value("segment ")
    page.keyboard.type("cat")  # the task button leaves the cursor after the prefix
    page.fill("#max-tokens", "32")
    page.click("#run")

    expect(page.locator("#answer")).to_have_text(ANSWER)
    expect(page.locator("#overlay")).to_have_attribute("data-detections", "1")
    expect(page.locator("#detections li")).to_have_text(["cat [150, 90, 600, 540]"])
    expect(page.locator("#stat-ttft")).to_have_text(re.compile(r"^\d+\.\d\d s$"))
    expect(page.locator("#stat-tps")).to_have_text(re.compile(r"^\d+\.\d tokens/s$"))
    expect(page.locator("#stat-rss")).to_have_text(re.compile(r"^\d+\.(\d\d GB|\d MB)$"))
    prompt_tokens = served.session.processor.prompt_inputs("segment cat")[0].shape[1]
    expect(page.locator("#stat-tokens")).to_have_text(f"{prompt_tokens} prompt + {generated} generated")
    expect(page.locator("#error")).to_be_hidden()

    [request] = sent
    body = request.post_data_json
    assert body["messages"][0]["content"][0] == {"type": "text", "text": "segment cat"}
    assert {k: body[k] for k in ("model", "stream", "max_tokens", "temperature")} == {
        "model": MODEL_ID,
        "stream": True,
        "max_tokens": 32,
        "temperature": 0,
    }
    url = body["messages"][0]["content"][1]["image_url"]["url"]
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert (image.format, image.size) == ("PNG", IMAGE_SIZE)

    # The box is the first colour, opaque, on its left edge; the mask a translucent tint inside its own rectangle.
    x0, y0, x1, y1 = BOX
    middle_y = (y0 + y1) / 2
    assert overlay_rgba(page, x0, middle_y) == [0xE6, 0x19, 0x4B, 255]
    mx0, my0, mx1, my1 = mask_rectangle()
    r, g, b, alpha = overlay_rgba(page, (mx0 + mx1) / 2, middle_y)
    assert 90 <= alpha <= 140 and r > g and r > b
    assert overlay_rgba(page, x0 + 10, my1 + 20)[3] == 0  # in the box, outside the mask
    assert overlay_rgba(page, IMAGE_SIZE[0] - 5, IMAGE_SIZE[1] - 5)[3] == 0

    screenshot = tmp_path / "page.png"
    page.screenshot(path=screenshot, full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(url.startswith((served.url, "data:", "blob:")) for url in requested), requested


def _fail_decoding(*args: object, **kwargs: object) -> None:
    raise RuntimeError("out of memory while decoding")


@pytest.mark.parametrize(
    ("case", "message", "answer"),
    [
        ("http_400", "HTTP 400: the prompt must not contain <image>", ""),
        ("stream_error", "Server error during generation: generation failed: RuntimeError: out of memory while "
                         "decoding", "<loc0128>"),
        ("network_failure", "Network error:", ""),
        ("no_image", "No image chosen", ""),
    ],
)  # fmt: skip
def test_errors_are_shown(served, forced, page, tmp_path, monkeypatch, case, message, answer):
    if case == "stream_error":  # the first token comes from the prefill, then the decode step fails
        forced(ANSWER)
        monkeypatch.setattr(engine_module, "decode_rows", _fail_decoding)
    if case == "network_failure":  # the connection drops before any response
        page.route(f"{served.url}/v1/chat/completions", lambda route: route.abort())
    before = chat_requests(served)
    open_page(page, served)
    if case != "no_image":
        upload_image(page, tmp_path)
    page.click("#task-caption")
    expect(page.locator("#prompt")).to_have_value("caption en")
    if case == "http_400":
        page.fill("#prompt", "caption <image> en")
    page.click("#run")

    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text(message)
    expect(page.locator("#answer")).to_have_text(answer)
    expect(page.locator("#run")).to_be_enabled()
    assert chat_requests(served) - before == (1 if case in ("http_400", "stream_error") else 0)


def test_unauthorized_reveals_api_key_field(served, forced, page, tmp_path, monkeypatch):
    forced(ANSWER)
    monkeypatch.setattr(served.state, "config", dataclasses.replace(served.state.config, api_key="sekret"))
    sent = sent_chats(page)
    open_page(page, served)
    expect(page.locator("#api-key")).to_be_hidden()
    upload_image(page, tmp_path)
    page.click("#task-ocr")
    page.click("#run")

    expect(page.locator("#api-key")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("HTTP 401: this server needs an API key")
    page.fill("#api-key", "sekret")
    page.click("#run")
    expect(page.locator("#answer")).to_have_text(ANSWER)
    expect(page.locator("#error")).to_be_hidden()
    assert [request.headers.get("authorization") for request in sent] == [None, "Bearer sekret"]

    page.reload()  # the key is remembered, so the field shows with it straight away
    expect(page.locator("#api-key")).to_have_value("sekret")
    expect(page.locator("#api-key")).to_be_visible()
