"""What every request passes before a route runs: it is counted (requests by endpoint and status), its API key is
checked and its body is bounded.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware, so streamed responses pass through untouched and
the body can be bounded while it is read: a Content-Length over the limit is refused before a byte of the body is
read, and a chunked body is counted as it arrives; the read that crosses the limit raises a 413 inside the route
(FastAPI re-raises HTTPExceptions met while reading a body), before the body is parsed.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_errors import HttpError, error_response
from .state import ServerState

OPEN_PATHS = frozenset({"/health", "/"})  # no key needed: a probe, and the page that asks for the key


class Guard:
    def __init__(self, app: ASGIApp, state: ServerState, endpoints: frozenset[str]):
        self.app, self.state, self.endpoints = app, state, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what is counted if the app fails before it answers
        path = scope["path"]

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(path, Headers(scope=scope))
            if refusal is not None:
                await error_response(path, refusal)(scope, receive, counted)
            else:
                await self.app(scope, self._bounded(receive), counted)
        finally:
            # Unknown paths share one label: a scan of random URLs must not grow the metrics without bound.
            self.state.metrics.request(path if path in self.endpoints else "other", status)

    def _refusal(self, path: str, headers: Headers) -> HttpError | None:
        key = self.state.config.api_key
        if key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if not token:
                return HttpError(401, "this server needs an API key: send the header Authorization: Bearer KEY",
                                 "missing_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            # compare_digest: the time taken does not tell how much of a guess was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return HttpError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.state.config.max_body:
            return self._too_large()
        return None

    def _too_large(self) -> HttpError:
        limit = self.state.config.max_body
        return HttpError(413, f"the request body is over this server's limit of {limit:,} bytes", "body_too_large")

    def _bounded(self, receive: Receive) -> Receive:
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.state.config.max_body:
                    raise self._too_large()
            return message

        return bounded
