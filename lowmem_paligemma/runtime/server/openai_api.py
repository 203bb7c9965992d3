"""The OpenAI flavour: the bodies of POST /v1/chat/completions and GET /v1/models, as the `openai` client sends and
reads them (the chat completion, its streamed chunks as server-sent events ending `data: [DONE]`).

PaliGemma answers one prompt about one image, so a conversation is read as: the prompt is the text of the last user
message (its text parts joined by a space), the image the last `image_url` sent anywhere in it; system and
assistant text is ignored. The defaults are the CLI's, not OpenAI's: temperature 0 (greedy, PaliGemma's own) and
max_tokens `defaults.MAX_NEW_TOKENS`. A prompt plus max_tokens over the model's context is a 400, never silently
clamped. The `paligemma` field (outputs.py) rides on the message, or on the final chunk of a stream.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...model.processor import check_prompt
from .engine import Result
from .http_errors import HttpError, error_body
from .jobs import Ask, Job, sampling, stop_strings

OWNER = "lowmem_paligemma"


class _Body(BaseModel):
    # Strict: "0.5" is not a number and true is not 1; unknown fields (logprobs, user, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str  # the object is OpenAI's; a bare string is what some clients send


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class ChatRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None


def check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise HttpError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                        "model_not_found", param="model")  # fmt: skip


def to_ask(body: ChatRequest) -> Ask:
    prompt, image = None, None
    for message in body.messages:
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for part in parts or []:
            if isinstance(part, ImagePart):
                image = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
        if message.role == "user":
            prompt = " ".join(p.text for p in parts or [] if isinstance(p, TextPart))
    if prompt is None:
        raise HttpError(400, "messages: no user message; the last user message's text is the prompt",
                        "invalid_request", param="messages")  # fmt: skip
    if image is None:
        raise HttpError(
            400, "PaliGemma needs an image to answer about: add an image_url content part (a data: URI) to a message",
            "image_required", param="messages",
        )  # fmt: skip
    if body.n not in (None, 1):
        raise HttpError(400, f"n must be 1 (one answer per request), got {body.n}", "invalid_value", param="n")
    tokens = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    options = sampling(
        {"max_new_tokens": body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
         "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed},
        {"max_new_tokens": tokens},
    )  # fmt: skip
    return Ask(check_prompt(prompt), image, options, stop_strings(body.stop, "stop"), body.stream)


def models(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model(model_id, created)]}


def model(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


def usage(result: Result) -> dict[str, int]:
    generated = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": generated,
            "total_tokens": result.prompt_tokens + generated}  # fmt: skip


def completion(model_id: str, result: Result, paligemma: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": result.text, "paligemma": paligemma}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage(result),
    }


async def stream(job: Job, model_id: str) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per new piece of text, a final chunk (finish_reason, usage,
    paligemma), then `data: [DONE]`. A request the engine ends sends an error event before [DONE]."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        body = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **extra,
        }
        return _event(body)  # fmt: skip

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in job.ticket.events():
            if event.text:
                yield chunk({"content": event.text})
            if event.error is not None:
                error = job.failure(event.error)
                yield _event(error_body("/v1", error.status_code, error.detail, error.code))
            if event.result is not None:
                paligemma = await job.extension(event.result)
                yield chunk({}, event.result.finish_reason, usage=usage(event.result), paligemma=paligemma)
        yield "data: [DONE]\n\n"
    finally:
        job.ticket.cancel()  # the client went away mid-stream (this generator was cancelled): free the slot


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
