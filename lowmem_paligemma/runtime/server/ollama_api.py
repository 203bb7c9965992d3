"""The ollama flavour: the bodies of POST /api/generate, POST /api/chat, GET /api/tags and GET /api/version, with
ollama's field names, as the `ollama` client (its _types.py) sends and reads them.

Answers stream as NDJSON by default (`"stream": false` for one object); the last line has `done: true`,
`done_reason`, the token counts (`prompt_eval_count` includes the image tokens) and durations in nanoseconds
(`load_duration` is 0: the model is loaded once, at start), plus the `paligemma` field (outputs.py). A request the
engine ends mid-stream gets an `{"error": ...}` line, which the client raises as a ResponseError.

What PaliGemma cannot honour is refused rather than ignored: `format` (structured output) and `suffix`. The
defaults are the CLI's: temperature 0 and `defaults.MAX_NEW_TOKENS` tokens (ollama's "no limit", num_predict -1,
is refused: a request must say what it may take). Options that tune ollama's runtime (num_ctx, num_thread, ...)
are ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ...model.processor import check_prompt
from .engine import Result
from .http_errors import HttpError
from .jobs import Ask, Job, sampling, stop_strings

FAMILY = "paligemma"


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Options(_Body):
    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None


class _Request(_Body):
    model: str
    stream: bool = True
    options: Options | None = None
    format: Any = None


class GenerateRequest(_Request):
    prompt: str = ""
    images: list[str] | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]


def check_model(name: str, model_id: str) -> None:
    if name not in (model_id, f"{model_id}:latest"):  # ollama names carry a tag; this server has one model
        raise HttpError(404, f"model {name!r} not found; this server serves {model_id!r}", "model_not_found")


def generate_ask(body: GenerateRequest) -> Ask:
    if body.suffix is not None:
        raise HttpError(400, "suffix is not supported: PaliGemma answers a prompt, it does not fill in", "unsupported")
    return _ask(body, body.prompt, (body.images or [None])[-1])


def chat_ask(body: ChatRequest) -> Ask:
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise HttpError(400, "messages: no user message; the last user message is the prompt", "invalid_request")
    images = [image for m in body.messages for image in m.images or []]
    return _ask(body, users[-1].content, images[-1] if images else None)


def _ask(body: _Request, prompt: str, image: str | None) -> Ask:
    if body.format not in (None, ""):
        raise HttpError(400, "format is not supported: PaliGemma's answers are plain text", "unsupported")
    if image is None:
        raise HttpError(400, "PaliGemma needs an image to answer about: send one in images (base64)", "image_required")
    o = body.options or Options()
    if o.num_predict is not None and o.num_predict < 1:
        raise HttpError(400, f"options.num_predict must be >= 1 (this server always bounds an answer), got "
                             f"{o.num_predict}", "invalid_value")  # fmt: skip
    options = sampling(
        {"max_new_tokens": o.num_predict, "temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p,
         "seed": o.seed},
        {"max_new_tokens": "num_predict"},
    )  # fmt: skip
    return Ask(check_prompt(prompt), image, options, stop_strings(o.stop, "options.stop"), body.stream)


def tags(model_id: str, weight_bytes: int, details: dict[str, Any], modified: float) -> dict[str, Any]:
    return {"models": [{"name": model_id, "model": model_id, "modified_at": _timestamp(modified),
                        "size": weight_bytes, "details": {"format": "safetensors", "family": FAMILY,
                                                          "families": [FAMILY], **details}}]}  # fmt: skip


def final(model_id: str, kind: str, text: str, result: Result, submitted_s: float, extra: dict) -> dict[str, Any]:
    """The last line (or the whole answer, unstreamed); `kind` is "generate" or "chat"."""
    ns = lambda seconds: int(seconds * 1e9)  # noqa: E731
    return {
        **_piece(model_id, kind, text),
        "done": True,
        "done_reason": result.finish_reason,
        "total_duration": ns(time.perf_counter() - submitted_s),
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": ns(result.queued_s + result.prefill_s),
        "eval_count": len(result.token_ids),
        "eval_duration": ns(result.decode_s),
        "paligemma": extra,
    }


async def stream(job: Job, model_id: str, kind: str) -> AsyncIterator[str]:
    try:
        async for event in job.ticket.events():
            if event.text:
                yield _line({**_piece(model_id, kind, event.text), "done": False})
            if event.error is not None:
                yield _line({"error": job.failure(event.error).detail})
            if event.result is not None:
                extra = await job.extension(event.result)
                yield _line(final(model_id, kind, "", event.result, job.ticket.submitted, extra))
    finally:
        job.ticket.cancel()  # the client went away mid-stream (this generator was cancelled): free the slot


def _piece(model_id: str, kind: str, text: str) -> dict[str, Any]:
    content = {"response": text} if kind == "generate" else {"message": {"role": "assistant", "content": text}}
    return {"model": model_id, "created_at": _timestamp(time.time()), **content}


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _line(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False) + "\n"
