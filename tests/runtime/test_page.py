"""The built-in web page (runtime/server/static/index.html) driven in a real headless Chromium.

Needs Debian's chromium (`apt-get install chromium`) and the playwright Python package, used only as a driver
for that browser (`playwright install` is never run). The page talks to a fake server written here until
`lowmem-paligemma serve` exists.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import lowmem_paligemma

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
fastapi = pytest.importorskip("fastapi", reason="fastapi is not installed: pip install fastapi uvicorn")
responses = pytest.importorskip("fastapi.responses", reason="fastapi is not installed: pip install fastapi uvicorn")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed: pip install fastapi uvicorn")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("chromium is not installed: apt-get install chromium", allow_module_level=True)
expect = sync_api.expect

PAGE = Path(lowmem_paligemma.__file__).parent / "runtime" / "server" / "static" / "index.html"
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
MODEL_ID = "paligemma-fake"
IMAGE_SIZE = (960, 720)
# A detection answer as PaliGemma writes it: y0 x0 y1 x1 in 1/1024 of the image, then the label.
PIECES = ["<loc0128><loc0160>", "<loc0768><loc0640>", " cat"]
LOCS = (128, 160, 768, 640)
RSS_BYTES = 3 * 2**29  # 1.50 GiB


def box_for(size: tuple[int, int]) -> list[float]:
    """The box PIECES encode, in pixels of an image of `size`, as the server would parse it."""
    y0, x0, y1, x1 = LOCS
    return [x0 / 1024 * size[0], y0 / 1024 * size[1], x1 / 1024 * size[0], y1 / 1024 * size[1]]


def mask_for(size: tuple[int, int]) -> tuple[str, list[float]]:
    """A mask 40 px inside the box (so box and mask can be told apart), as base64 PNG mode L, and its rectangle."""
    x0, y0, x1, y1 = box_for(size)
    inner = [x0 + 40, y0 + 40, x1 - 40, y1 - 40]
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(inner, fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode(), inner


@dataclass
class FakeServer:
    url: str
    behaviour: str = "stream"  # "stream", "http_400" or "stream_error"
    api_key: str | None = None
    requests: list[dict] = field(default_factory=list)  # what the page sent, for the tests to check


def chunk_event(delta: dict, finish_reason: str | None = None, **extra: object) -> str:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL_ID,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }
    return f"data: {json.dumps(chunk)}\n\n"


def error_body(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


async def stream_events(server: FakeServer, image_size: tuple[int, int]) -> AsyncIterator[str]:
    for i, piece in enumerate(PIECES):
        event = chunk_event({"content": piece})
        if i == 1:  # one event in two network chunks, so the page must buffer a partial line
            yield event[:25]
            await asyncio.sleep(0.05)
            event = event[25:]
        yield event
        await asyncio.sleep(0.05)
        if server.behaviour == "stream_error":
            yield f"data: {json.dumps(error_body('out of memory while decoding', 'server_error', 500))}\n\n"
            yield "data: [DONE]\n\n"
            return
    mask, _ = mask_for(image_size)
    yield chunk_event(
        {},
        "stop",
        usage={"prompt_tokens": 260, "completion_tokens": 3, "total_tokens": 263},
        paligemma={
            "detections": [{"label": "cat", "box": box_for(image_size), "mask": mask}],
            "timings": {"ttft_s": 0.123, "prefill_s": 0.1, "decode_tokens_per_s": 8.5},
            "memory": {"rss_bytes": RSS_BYTES},
        },
    )
    yield "data: [DONE]\n\n"


def fake_app(server: FakeServer) -> fastapi.FastAPI:
    app = fastapi.FastAPI()

    @app.get("/")
    def index() -> responses.HTMLResponse:
        return responses.HTMLResponse(PAGE.read_text())

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": MODEL_ID}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "lowmem_paligemma"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request) -> responses.Response:
        body = await request.json()
        authorization = request.headers.get("authorization")
        url = next(part["image_url"]["url"] for part in body["messages"][0]["content"] if part["type"] == "image_url")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        server.requests.append(
            {"body": body, "authorization": authorization, "image_format": image.format, "image_size": image.size}
        )
        if server.api_key and authorization != f"Bearer {server.api_key}":
            return responses.JSONResponse(error_body("invalid API key", "authentication_error", 401), 401)
        if server.behaviour == "http_400":
            return responses.JSONResponse(error_body("the image could not be decoded", "invalid_request", 400), 400)
        return responses.StreamingResponse(stream_events(server, image.size), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A stand-in for `lowmem-paligemma serve`, TO BE REPLACED BY THE REAL SERVER APP once it exists: serves the
    real index.html and follows the HTTP contract with canned answers. uvicorn in a thread on a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    state = FakeServer(url=f"http://127.0.0.1:{sock.getsockname()[1]}")
    config = uvicorn.Config(fake_app(state), log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake server did not start within 10 s"
        time.sleep(0.02)
    yield state
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: sync_api.Browser, fake_server: FakeServer) -> Iterator[sync_api.Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(10_000)  # every click, fill and wait gives up after 10 s
    yield page
    context.close()


def open_page(page: sync_api.Page, server: FakeServer) -> None:
    page.goto(server.url + "/")
    expect(page.locator("#server-status")).to_have_text(f"model: {MODEL_ID}")


def upload_image(page: sync_api.Page, tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    image = Image.new("RGB", IMAGE_SIZE, (120, 160, 110))
    ImageDraw.Draw(image).ellipse(box_for(IMAGE_SIZE), fill=(200, 150, 90))
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


def test_detect_streams_answer_and_draws_box_and_mask(fake_server, page, tmp_path):
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    open_page(page, fake_server)
    upload_image(page, tmp_path)
    page.click("#task-detect")
    expect(page.locator("#prompt")).to_have_value("detect ")
    page.keyboard.type("cat")  # the task button leaves the cursor after the prefix
    page.fill("#max-tokens", "32")
    page.click("#run")

    expect(page.locator("#answer")).to_have_text("".join(PIECES))
    expect(page.locator("#overlay")).to_have_attribute("data-detections", "1")
    x0, y0, x1, y1 = box_for(IMAGE_SIZE)
    expect(page.locator("#detections li")).to_have_text([f"cat [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]"])
    expect(page.locator("#stat-ttft")).to_have_text("0.12 s")
    expect(page.locator("#stat-tps")).to_have_text("8.5 tokens/s")
    expect(page.locator("#stat-rss")).to_have_text("1.50 GiB")
    expect(page.locator("#stat-tokens")).to_have_text("260 prompt + 3 generated")
    expect(page.locator("#error")).to_be_hidden()

    [sent] = fake_server.requests
    assert sent["body"]["messages"][0]["content"][0] == {"type": "text", "text": "detect cat"}
    assert {k: sent["body"][k] for k in ("model", "stream", "max_tokens", "temperature")} == {
        "model": MODEL_ID,
        "stream": True,
        "max_tokens": 32,
        "temperature": 0,
    }
    assert (sent["image_format"], sent["image_size"]) == ("PNG", IMAGE_SIZE)

    # The box is the first colour, opaque, on its left edge; the mask a translucent tint inside its own rectangle.
    middle_y = (y0 + y1) / 2
    assert overlay_rgba(page, x0, middle_y) == [0xE6, 0x19, 0x4B, 255]
    _, (mx0, my0, mx1, my1) = mask_for(IMAGE_SIZE)
    r, g, b, alpha = overlay_rgba(page, (mx0 + mx1) / 2, middle_y)
    assert 90 <= alpha <= 140 and r > g and r > b
    assert overlay_rgba(page, x0 + 10, my1 + 20)[3] == 0  # in the box, outside the mask
    assert overlay_rgba(page, IMAGE_SIZE[0] - 5, IMAGE_SIZE[1] - 5)[3] == 0

    screenshot = tmp_path / "page.png"
    page.screenshot(path=screenshot, full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(url.startswith((fake_server.url, "data:", "blob:")) for url in requested), requested


@pytest.mark.parametrize(
    ("case", "message", "answer"),
    [
        ("http_400", "HTTP 400: the image could not be decoded", ""),
        ("stream_error", "Server error during generation: out of memory while decoding", PIECES[0]),
        ("network_failure", "Network error:", ""),
        ("no_image", "No image chosen", ""),
    ],
)
def test_errors_are_shown(fake_server, page, tmp_path, case, message, answer):
    fake_server.behaviour = case
    if case == "network_failure":  # the connection drops before any response
        page.route(f"{fake_server.url}/v1/chat/completions", lambda route: route.abort())
    open_page(page, fake_server)
    if case != "no_image":
        upload_image(page, tmp_path)
    page.click("#task-caption")
    expect(page.locator("#prompt")).to_have_value("caption en")
    page.click("#run")

    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text(message)
    expect(page.locator("#answer")).to_have_text(answer)
    expect(page.locator("#run")).to_be_enabled()
    assert len(fake_server.requests) == (1 if case in ("http_400", "stream_error") else 0)


def test_unauthorized_reveals_api_key_field(fake_server, page, tmp_path):
    fake_server.api_key = "sekret"
    open_page(page, fake_server)
    expect(page.locator("#api-key")).to_be_hidden()
    upload_image(page, tmp_path)
    page.click("#task-ocr")
    page.click("#run")

    expect(page.locator("#api-key")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("HTTP 401: invalid API key")
    page.fill("#api-key", "sekret")
    page.click("#run")
    expect(page.locator("#answer")).to_have_text("".join(PIECES))
    expect(page.locator("#error")).to_be_hidden()
    assert [sent["authorization"] for sent in fake_server.requests] == [None, "Bearer sekret"]

    page.reload()  # the key is remembered, so the field shows with it straight away
    expect(page.locator("#api-key")).to_have_value("sekret")
    expect(page.locator("#api-key")).to_be_visible()
