"""The server's fixtures: one real `lowmem-paligemma serve` app (uvicorn in a thread on a free 127.0.0.1 port) over the
tiny PaliGemma 2 in float32, shared by the server tests and the page test; helpers to make images and requests."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

MODEL_ID = "tiny-pg2"
START_TIMEOUT_S = 10


@dataclass
class Served:
    url: str
    app: object  # the FastAPI app
    media_dir: Path  # the server's --media-dir
    vae: Path  # the server's --vae (synthetic weights)

    @property
    def state(self):  # the ServerState the routes read (tests change its config and engine limits, then restore)
        return self.app.state.server

    @property
    def session(self):
        return self.state.engine.session


@contextmanager
def serving(app: object) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port of 127.0.0.1; its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"the server did not start in {START_TIMEOUT_S} s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def served(tiny_pg2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("fastapi", reason="the server needs its extra: pip install -e '.[serve]'")
    from lowmem_paligemma import LoadOptions, load_session
    from lowmem_paligemma.model.tasks import write_synthetic_vae_npz
    from lowmem_paligemma.runtime.server.app import app_for_session
    from lowmem_paligemma.runtime.server.config import ServerConfig

    media_dir = tmp_path_factory.mktemp("media")
    vae = write_synthetic_vae_npz(tmp_path_factory.mktemp("vae") / "vae-oid.npz")
    session = load_session(tiny_pg2_dir, LoadOptions(dtype="float32"))
    app = app_for_session(session, MODEL_ID, ServerConfig(media_dir=media_dir, vae=vae), parallel=8, max_queue=8)
    with serving(app) as url:
        yield Served(url, app, media_dir, vae)


def random_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def chat_body(prompt: str, image_url: str | None, **fields: object) -> dict:
    content: list[dict] = [{"type": "text", "text": prompt}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture
def forced(served: Served, monkeypatch: pytest.MonkeyPatch):
    """`forced(text)`: every request the engine runs from now on (one at a time) generates the tokens of `text`, then
    EOS, whatever the model's logits say: a known detect / segment answer from a model with random weights."""
    from lowmem_paligemma.runtime.server import engine as engine_module

    def force(text: str) -> list[int]:
        eos = served.session.model.cfg.eos_token_ids[0]
        ids = served.session.processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        count = iter(range(10**9))

        def sample(logits: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            return torch.tensor([ids[next(count) % len(ids)]])  # a request ends at EOS: the next starts over

        monkeypatch.setattr(engine_module, "sample_next_token", sample)
        return ids

    return force
