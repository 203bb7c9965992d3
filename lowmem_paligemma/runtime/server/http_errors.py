"""Every error the server answers, in the shape its client expects: ollama's `{"error": "message"}` under /api/,
OpenAI's `{"error": {"message", "type", "code", "param"}}` everywhere else. FastAPI's own errors (validation, 404,
405) and a bug's 500 go through the same handlers, so no client ever sees a framework's default body.

Status codes: 400 for anything wrong with the request (a bad value, an image that does not decode, a prompt too
long for the context, a request that could never fit in memory), 401 no or wrong API key, 404 unknown model or
route, 405, 413 body too large, 503 loading / queue full / shutting down (with Retry-After when trying again helps).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ...errors import ContextLengthError, ImageError, InsufficientMemoryError, LowmemError, OptionError, PromptError
from .engine import Busy, ShuttingDown

BUSY_RETRY_S = 2  # Retry-After of a full queue: about one short answer's time
LOADING_RETRY_S = 5  # Retry-After while the model loads
SHOWN_ERRORS = 3  # validation errors named in one message
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 503: "server_error"}


class HttpError(HTTPException):
    """An error response: its status, a one-line message, a short machine-readable code and the field at fault."""

    def __init__(
        self, status: int, message: str, code: str, *, headers: dict[str, str] | None = None, param: str | None = None
    ):
        super().__init__(status, message, headers)
        self.code, self.param = code, param


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    if is_ollama(path):
        return {"error": message}
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_response(path: str, error: HttpError) -> JSONResponse:
    body = error_body(path, error.status_code, error.detail, error.code, error.param)
    return JSONResponse(body, error.status_code, headers=error.headers)


def from_lowmem(e: LowmemError) -> HttpError:
    """The HTTP error of a library failure (the engine's refusals, a bad image or prompt, a bad option)."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, Busy):
        return HttpError(503, message, "server_busy", headers={"Retry-After": str(BUSY_RETRY_S)})
    if isinstance(e, ShuttingDown):
        return HttpError(503, message, "shutting_down")
    codes = {ContextLengthError: "context_length_exceeded", InsufficientMemoryError: "insufficient_memory",
             ImageError: "invalid_image", PromptError: "invalid_prompt", OptionError: "invalid_value"}  # fmt: skip
    code = next((c for kind, c in codes.items() if isinstance(e, kind)), "invalid_request")
    return HttpError(400, message, code, param=getattr(e, "option", None))


def validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors as one line: `messages.0.content: Input should be a valid string; ...`."""
    parts = []
    for error in errors[:SHOWN_ERRORS]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON ({detail})" if detail else "the body is not valid JSON")
        elif not where:
            parts.append("the body must be a JSON object" if error.get("type") == "missing" else error.get("msg", ""))
        else:
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = len(errors) - SHOWN_ERRORS
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def install(app: FastAPI) -> None:
    """Route every error through `error_response`."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        if isinstance(e, HttpError):
            return error_response(request.url.path, e)
        # The router's own: an unknown path or method, in the same shape.
        method, path = request.method, request.url.path
        if e.status_code == 404:
            return error_response(path, HttpError(404, f"{method} {path}: no such endpoint", "not_found"))
        if e.status_code == 405:
            return error_response(path, HttpError(405, f"{method} is not allowed on {path}", "method_not_allowed",
                                                  headers=e.headers))  # fmt: skip
        return error_response(path, HttpError(e.status_code, str(e.detail), "http_error", headers=e.headers))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        path, kinds = request.url.path, {err.get("type") for err in errors}
        if "json_invalid" in kinds:
            return error_response(path, HttpError(400, validation_message(errors), "invalid_json"))
        content_type = request.headers.get("content-type", "")
        if not _is_json(content_type):
            # FastAPI reads a body as JSON only when it says it is: a form post from another site is not JSON.
            message = f"send the body as JSON with Content-Type: application/json (got {content_type or 'none'})"
            return error_response(path, HttpError(400, message, "invalid_content_type"))
        param = ".".join(str(p) for p in errors[0].get("loc", ()) if p != "body") if errors else ""
        return error_response(path, HttpError(400, validation_message(errors), "invalid_value", param=param or None))

    @app.exception_handler(LowmemError)
    async def refused(request: Request, e: LowmemError) -> JSONResponse:
        return error_response(request.url.path, from_lowmem(e))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        # A bug, not a user's failure: Starlette re-raises it after this answer, so the ASGI server logs its
        # traceback; the client gets the exception's name only.
        error = HttpError(500, f"internal error ({type(e).__name__}); see the server's log", "internal_error")
        return error_response(request.url.path, error)
