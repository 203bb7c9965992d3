"""The HTTP routes of `lowmem-paligemma serve` (docs/serve.md): each a few lines over the flavour that reads and
writes its bodies (openai_api.py, ollama_api.py), jobs.py (image, engine, answer) and the server's state.

    GET  /                      the web page (static/index.html)
    GET  /health                503 {"status": "loading"} until the model is ready, then 200; never needs the key
    GET  /metrics               Prometheus text (metrics.py)
    GET  /v1/models[/{id}]      POST /v1/chat/completions                    the OpenAI flavour
    GET  /api/tags, /api/version  POST /api/generate, /api/chat              the ollama flavour

Every request first passes the guard (guard.py: counted, API key, body size); every error has its flavour's shape
(http_errors.py). `create_app(state)` serves whatever `state.engine` becomes (the CLI loads the model after the
server listens); `app_for_session` is the library's entry: the ASGI app for a loaded session.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from ..session import Session
from . import http_errors, jobs, media, ollama_api, openai_api
from .config import ServerConfig
from .engine import Engine
from .guard import Guard
from .metrics import CONTENT_TYPE
from .state import ServerState

CLIENT_GONE = 499  # the status counted for a client that hung up before its answer (nginx's convention)
# Proxies (nginx) buffer responses by default, which would hold a stream back until it ends.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _package_version() -> str:
    try:
        return version("lowmem_paligemma")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(state: ServerState) -> FastAPI:
    page = (files(__package__) / "static" / "index.html").read_text(encoding="utf-8")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(state.stop)  # running requests end with an error event; the engine thread exits

    # No /docs or /redoc: they load their scripts from a CDN, and this server promises no outbound requests.
    app = FastAPI(title="lowmem_paligemma", version=_package_version(), docs_url=None, redoc_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.server = state  # for whoever holds the app: the engine, the config
    http_errors.install(app)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None or state.stopping:
            status = "stopping" if state.stopping else "loading"
            headers = {"Retry-After": str(http_errors.LOADING_RETRY_S)}
            return JSONResponse({"status": status}, 503, headers=headers)
        return JSONResponse({"status": "ok", "model": state.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # --- OpenAI ----------------------------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        jobs.engine_of(state)
        return JSONResponse(openai_api.models(state.model_id, created))

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> JSONResponse:
        jobs.engine_of(state)
        openai_api.check_model(name, state.model_id)
        return JSONResponse(openai_api.model(state.model_id, created))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: openai_api.ChatRequest, http: HttpRequest) -> Response:
        openai_api.check_model(body.model, state.model_id)
        ask = openai_api.to_ask(body)
        c = state.config
        job = await jobs.start(state, ask, lambda: media.from_url(ask.image, c.media_dir, c.max_body,
                                                                  c.max_image_pixels))  # fmt: skip
        if ask.stream:
            return StreamingResponse(openai_api.stream(job, state.model_id), media_type="text/event-stream",
                                     headers=STREAM_HEADERS, background=BackgroundTask(job.ticket.cancel))  # fmt: skip
        result = await jobs.collect(job, http)
        if result is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(openai_api.completion(state.model_id, result, await job.extension(result)))

    # --- ollama ----------------------------------------------------------------------------------------------------

    @app.get("/api/version")
    async def ollama_version() -> JSONResponse:
        return JSONResponse({"version": _package_version()})

    @app.get("/api/tags")
    async def ollama_tags() -> JSONResponse:
        session = jobs.engine_of(state).session
        return JSONResponse(ollama_api.tags(state.model_id, session.weight_bytes, _details(session), created))

    @app.post("/api/generate")
    async def ollama_generate(body: ollama_api.GenerateRequest, http: HttpRequest) -> Response:
        ollama_api.check_model(body.model, state.model_id)
        return await _ollama(ollama_api.generate_ask(body), "generate", http)

    @app.post("/api/chat")
    async def ollama_chat(body: ollama_api.ChatRequest, http: HttpRequest) -> Response:
        ollama_api.check_model(body.model, state.model_id)
        return await _ollama(ollama_api.chat_ask(body), "chat", http)

    async def _ollama(ask: jobs.Ask, kind: str, http: HttpRequest) -> Response:
        c = state.config
        job = await jobs.start(state, ask, lambda: media.from_base64(ask.image, "images[-1]", c.max_body,
                                                                     c.max_image_pixels))  # fmt: skip
        if ask.stream:
            return StreamingResponse(ollama_api.stream(job, state.model_id, kind), media_type="application/x-ndjson",
                                     headers=STREAM_HEADERS, background=BackgroundTask(job.ticket.cancel))  # fmt: skip
        result = await jobs.collect(job, http)
        if result is None:
            return Response(status_code=CLIENT_GONE)
        extra = await job.extension(result)
        return JSONResponse(ollama_api.final(state.model_id, kind, result.text, result, job.ticket.submitted, extra))

    # Outermost, after the routes exist: it labels its counts with their paths.
    app.add_middleware(Guard, state=state, endpoints=frozenset(route.path for route in app.routes))
    return app


def _details(session: Session) -> dict[str, str]:
    parameters = sum(p.numel() for p in session.model.parameters())
    size = f"{parameters / 1e9:.1f}B" if parameters >= 1e8 else f"{parameters / 1e6:.1f}M"
    return {"parameter_size": size, "quantization_level": session.loaded.quantize or session.dtype}


def app_for_session(
    session: Session,
    model_id: str,
    config: ServerConfig = ServerConfig(),
    *,
    parallel: int | None = None,
    max_queue: int | None = None,
) -> FastAPI:
    """The ASGI app serving a loaded session (run it with any ASGI server: `uvicorn.run(app)`); its engine is
    started now and stopped with the app's lifespan. `parallel` / `max_queue`: the engine's, None for its defaults."""
    state = ServerState(model_id, config)
    limits = {k: v for k, v in (("parallel", parallel), ("max_queue", max_queue)) if v is not None}
    engine = Engine(session, max_memory=session.options.max_memory, observer=state.metrics, **limits)
    engine.start()
    state.engine = engine
    return create_app(state)
