"""Running the server: listen at once, load the model in the background, stop promptly on a signal.

The socket is bound first (a port in use is one error, at once) and uvicorn serves from that moment: /health
answers 503 while a thread loads the model, then the engine starts and requests are admitted. A load that fails
stops the server and is raised to the caller (the CLI's one `Error:` line), never a server left hanging.

Ctrl-C / SIGTERM: uvicorn stops accepting and waits for open connections, but a stream keeps its connection open
until its last token; so the signal also stops the engine (each running request ends with a "shutting down"
error and its connection closes), and uvicorn's graceful timeout bounds whatever is left. uvicorn then re-raises
the signal: SIGTERM ends the process as SIGTERM does, Ctrl-C becomes the CLI's "interrupted" and exit code 130.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from ...pretrained.model_dir import resolve_model_dir
from ...pretrained.options import LoadOptions
from ..session import Session, load_session
from .app import create_app
from .config import ServerConfig
from .engine import Engine
from .state import ServerState

GRACEFUL_S = 5  # what uvicorn waits for open connections after a signal, at most


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # engine.stop joins the engine's thread: not in a signal handler, which runs on the event loop's thread.
        threading.Thread(target=self.state.stop, name="stop", daemon=True).start()
        super().handle_exit(sig, frame)


def model_name(model_dir: str | os.PathLike) -> str:
    """What clients call the model: the directory's name, or the Hub id as given."""
    path = Path(model_dir)
    return path.resolve().name if path.is_dir() else os.fspath(model_dir)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or an OSError that says which address failed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart does not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)  # from now on connections queue, even before uvicorn runs (uvicorn's own backlog)
    return sock


def serve(
    model_dir: str | os.PathLike,
    load: LoadOptions,
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    parallel: int | None = None,
    max_queue: int | None = None,
    progress: bool = False,
    on_listening: Callable[[str, str], None] = lambda url, model_id: None,
    on_ready: Callable[[Session], None] = lambda session: None,
) -> None:
    """Serve `model_dir` until a signal; raises what made the load fail. `on_listening(url, model_id)` is called
    once the socket is bound, `on_ready(session)` (from the loading thread) once requests are admitted."""
    resolve_model_dir(model_dir)  # a missing directory fails before anything listens
    state = ServerState(model_name(model_dir), config)  # loads the VAE: a bad file fails here too
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    server = _Server(
        uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=GRACEFUL_S), state
    )
    failure: list[BaseException] = []
    limits = {k: v for k, v in (("parallel", parallel), ("max_queue", max_queue)) if v is not None}

    def load_model() -> None:
        try:
            session = load_session(model_dir, load, progress=progress)
            engine = Engine(session, max_memory=load.max_memory, observer=state.metrics, **limits)
            engine.start()
            state.engine = engine
            if state.stopping:  # a signal came while loading
                engine.stop()
                return
            on_ready(session)
        except Exception as e:  # raised again by serve() once the server has stopped
            failure.append(e)
            server.should_exit = True

    host_in_url = f"[{bound_host}]" if ":" in bound_host else bound_host
    on_listening(f"http://{host_in_url}:{bound_port}", state.model_id)
    threading.Thread(target=load_model, name="load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failure:
        raise failure[0]
