"""A request on its way through the engine, whichever API flavour it came in by.

The flavours (openai_api.py, ollama_api.py) turn a body into an `Ask`; `start` decodes its image and submits it
(both off the event loop: decoding and tokenizing a large input would stall every other client) and returns a
`Job`. A streamed answer is the flavour's generator over `Job.ticket.events()`, which cancels the ticket when the
client goes (Starlette cancels the generator on a disconnect); `collect` waits for a whole answer and cancels it
if the client hangs up first. Either way a cancelled request leaves the engine's batch within one decode step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from ...errors import OptionError
from ...model.sampling import SamplingOptions
from .engine import Engine, Request, Result, Ticket
from .http_errors import LOADING_RETRY_S, HttpError
from .media import Picture
from .outputs import extension
from .state import ServerState

MAX_STOPS = 16  # stop strings in one request (OpenAI allows 4); each is checked against every new piece of text
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class Ask:
    prompt: str
    image: str  # as the client sent it: an OpenAI image URL, or an ollama base64 string
    sampling: SamplingOptions
    stop: tuple[str, ...]
    stream: bool


@dataclass(frozen=True)
class Job:
    ask: Ask
    picture: Picture
    ticket: Ticket
    state: ServerState

    async def extension(self, result: Result) -> dict[str, Any]:
        """The `paligemma` field (outputs.py); masks are decoded in a worker thread."""
        return await run_in_threadpool(extension, result, self.ask.prompt, self.picture.image.size, self.state.vae)

    def failure(self, message: str) -> HttpError:
        """The error of a request the engine ended: the server stopping (503), or a failure while generating."""
        if self.state.stopping:
            return HttpError(503, "the server is shutting down", "shutting_down")
        return HttpError(500, f"generation failed: {message}", "generation_failed")


def engine_of(state: ServerState) -> Engine:
    if state.stopping:
        raise HttpError(503, "the server is shutting down", "shutting_down")
    if state.engine is None:
        raise HttpError(503, "the model is still loading; try again shortly", "loading",
                        headers={"Retry-After": str(LOADING_RETRY_S)})  # fmt: skip
    return state.engine


def sampling(values: dict[str, Any], spelled: dict[str, str]) -> SamplingOptions:
    """SamplingOptions from the fields a client set (None: the library's default), an OptionError reworded with the
    client's own field names (`spelled`: max_new_tokens -> max_tokens)."""
    try:
        return SamplingOptions(**{k: v for k, v in values.items() if v is not None})
    except OptionError as e:
        message = str(e)
        for ours, theirs in spelled.items():
            message = message.replace(ours, theirs)
        raise HttpError(400, message, "invalid_value", param=spelled.get(e.option or "", e.option)) from None


def stop_strings(value: str | list[str] | None, field: str) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise HttpError(400, f"{field}: at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters",
                        "invalid_value", param=field)  # fmt: skip
    return tuple(s for s in stops if s)


async def start(state: ServerState, ask: Ask, load: Callable[[], Picture]) -> Job:
    """Decode the image (`load`), then queue the request; the engine's refusals (too long for the context, never
    fits in memory, queue full, shutting down) are raised here as LowmemErrors, before any model work."""
    engine = engine_of(state)
    picture = await run_in_threadpool(load)
    request = Request(picture.image, picture.key, ask.prompt, ask.sampling, ask.stop)
    ticket = await run_in_threadpool(engine.submit, request, asyncio.get_running_loop())
    return Job(ask, picture, ticket, state)


async def collect(job: Job, http: HttpRequest) -> Result | None:
    """The finished request's result, or None if the client hung up first (the request is then cancelled)."""

    async def finish() -> Result:
        async for event in job.ticket.events():
            if event.error is not None:
                raise job.failure(event.error)
            if event.result is not None:
                return event.result
        raise job.failure("the engine ended the request without a result")

    async def hang_up() -> None:  # the body is read: the next message is the client going away
        while (await http.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(finish()), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        job.ticket.cancel()  # nothing when it has finished; frees the slot when it has not
        for task in (answer, gone):
            task.cancel()
    return answer.result() if answer.done() and not answer.cancelled() else None
