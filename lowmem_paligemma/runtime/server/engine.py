"""The server's engine: one model, many clients, continuous batching.

One thread owns the model. Requests wait in a bounded queue; between decode steps the engine admits the next
waiting request when a slot is free (`parallel`) and its memory fits (its KV cache and prefill, budget/memory.py,
against what the loaded model leaves of the budget), prefills it alone, then decodes every running request
together (generate.decode_rows: the weights are read once per step for the whole batch; under a memory budget the
streamed layers too). Each request samples with its own settings and generator and stops on its own rule (EOS,
its token limit, a stop string, its client gone); a finished or cancelled request frees its slot before the next
step. A request's tokens are those it gets alone (tests/runtime/test_engine.py: bit for bit in float32).

Two caches: image features by the image's hash (a follow-up question on the same image skips the vision tower),
and a prompt's KV cache and first logits by (image hash, prompt) (the same prompt again skips its prefill). A
different question on the same image cannot reuse more: the prefix is one bidirectional block (docs/model.md,
"Prefix-LM mask"), so every image token's keys depend on the question's words.

Front ends talk to it from asyncio: `submit` refuses at once what can never run (too long, too big, queue full,
shutting down) and returns a `Ticket` whose `events()` yield the text as it is generated; `cancel()` (a client
that hung up) frees the request's slot within one decode step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image

from ...budget.memory import request_bytes
from ...checkpoint.preflight import available_bytes
from ...errors import InsufficientMemoryError, LowmemError
from ...model.gemma import KVCache
from ...model.generate import check_length, decode_rows, encode_image, prefill
from ...model.sampling import SamplingOptions, sample_next_token
from ...model.text_stream import TextStream
from ...profiling.profiler import current_rss
from ...units import format_bytes
from ..session import Session

IMAGE_CACHE_ENTRIES = 32  # image features kept (PaliGemma-3B-224: 1 MB each in bf16)
PROMPT_CACHE_BYTES = 256 << 20  # prompt KV caches kept (PaliGemma-3B-224: ~5 MB for a 260-token prompt)
MEMORY_MARGIN_BYTES = 256 << 20  # without a budget: what admission leaves of the memory available at start


class Busy(LowmemError):
    """The queue is full: try again later (HTTP 503 with Retry-After)."""


class ShuttingDown(LowmemError):
    """The server stops: no new requests, running ones are ended."""


@dataclass(frozen=True)
class Request:
    image: Image.Image
    image_key: str  # the image's identity for the caches: sha256 of its bytes
    prompt: str
    sampling: SamplingOptions = SamplingOptions()
    stop: tuple[str, ...] = ()  # the text ends before the first of these


@dataclass(frozen=True)
class Result:
    text: str  # decoded (special tokens skipped), cut before a stop string
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    queued_s: float  # submitted -> admitted
    ttft_s: float  # submitted -> first token
    prefill_s: float  # admitted -> first token (image, prompt)
    decode_s: float  # first token -> last
    cached: str  # what the caches saved: "none", "image" or "prompt"

    @property
    def tokens_per_s(self) -> float | None:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None


@dataclass(frozen=True)
class Event:
    text: str = ""  # new text (may be empty)
    result: Result | None = None  # on the last event of a finished request
    error: str | None = None  # on the last event of a request the server ended (shutting down, a failure)


class Observer(Protocol):
    """What the engine reports as it works (the server's metrics)."""

    def batch(self, size: int, seconds: float) -> None: ...
    def first_token(self, seconds: float, prompt_tokens: int) -> None: ...
    def finished(self, result: Result) -> None: ...


class _NoObserver:
    def batch(self, size: int, seconds: float) -> None:
        pass

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        pass

    def finished(self, result: Result) -> None:
        pass


class Ticket:
    """A submitted request: its events, in order, as the engine produces them; `cancel()` ends it."""

    def __init__(self, request: Request, prompt_tokens: int, need: int, loop: asyncio.AbstractEventLoop):
        self.request, self.prompt_tokens, self.need = request, prompt_tokens, need
        self.submitted = time.perf_counter()
        self._loop, self._queue = loop, asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if event.result is not None or event.error is not None:
                return

    def _put(self, event: Event) -> None:  # from the engine's thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class StopText:
    """Cuts the text before the first stop string, holding back a tail that could still become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text, self.sent = "", 0  # everything decoded; how much of it was given out

    def push(self, piece: str) -> tuple[str, bool]:
        """The text that is safe to give out now, and whether a stop string was met (nothing follows it)."""
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        if hits:
            return self._give(min(hits)), True
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        return self._give(len(self.text) - hold), False

    def flush(self) -> str:
        """What was held back, at the end of a text that met no stop string."""
        return self._give(len(self.text))

    def _give(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


@dataclass
class _Running:
    ticket: Ticket
    cache: KVCache
    slot: int  # where the next token goes in the cache
    token: int  # the last sampled token, fed at `slot`
    ids: list[int]
    stream: TextStream
    stop: StopText
    generator: torch.Generator | None
    admitted: float
    first: float
    cached: str
    done: str | None = None  # the finish reason once decided
    text: list[str] = field(default_factory=list)


class Engine:
    """See the module docstring. `max_memory`: the session's budget (bytes of peak RSS), None for the memory
    available when the engine starts."""

    def __init__(
        self,
        session: Session,
        *,
        parallel: int = 4,
        max_queue: int = 16,
        max_memory: int | None = None,
        observer: Observer | None = None,
    ):
        if parallel < 1 or max_queue < 0:
            raise ValueError(f"parallel must be >= 1 and max_queue >= 0, got {parallel}, {max_queue}")
        self.session, self.parallel, self.max_queue = session, parallel, max_queue
        self.observer = observer or _NoObserver()
        model = session.model
        self.cfg, self.dtype, self.eos = model.cfg, model.dtype, set(model.cfg.eos_token_ids)
        rss = current_rss()["rss"]
        free = max_memory - rss if max_memory is not None else available_bytes(model.device) - MEMORY_MARGIN_BYTES
        self.capacity = max(0, free - PROMPT_CACHE_BYTES)  # what requests may take beside the model and the caches
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: list[_Running] = []
        self._starting = 0  # admitted, being prefilled: in neither list, but holding a slot
        self._images: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._prompts: collections.OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
        self._prompts = collections.OrderedDict()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # --- the front ends' side ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Admit nothing more; end every queued and running request with an error event; wait for the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue `request`; raises at once what could never run: a prompt + max_new_tokens over the context
        (ContextLengthError), a request whose memory the budget cannot hold even alone (InsufficientMemoryError),
        a full queue (Busy), a server shutting down (ShuttingDown)."""
        prompt_tokens = int(self.session.processor.prompt_inputs(request.prompt)[0].shape[1])
        check_length(self.cfg.text, prompt_tokens, request.sampling.max_new_tokens)
        need = request_bytes(self.cfg, prompt_tokens, request.sampling.max_new_tokens, self.dtype).total
        if need > self.capacity:
            raise InsufficientMemoryError(
                f"this request needs {format_bytes(need)} (KV cache and activations for {prompt_tokens} prompt tokens "
                f"+ {request.sampling.max_new_tokens} new) but the server's memory leaves {format_bytes(self.capacity)}"
                " for requests; ask for fewer tokens"
            )
        ticket = Ticket(request, prompt_tokens, need, loop or asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue + max(0, self.parallel - len(self._running) - self._starting):
                raise Busy(f"{len(self._running)} requests running and {len(self._waiting)} waiting: try again later")
            self._waiting.append(ticket)
            self._lock.notify_all()
        return ticket

    # --- the engine's thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._running and not self._waiting:
                    self._lock.wait()
                if self._stopping:
                    break
                admit = self._admissible()
                self._starting = len(admit)
            for ticket in admit:
                self._start(ticket)
                with self._lock:
                    self._starting -= 1
            self._drop_finished()
            if self._running:
                self._step()
                self._drop_finished()
        for ticket in [*self._waiting, *(r.ticket for r in self._running)]:
            ticket._put(Event(error="the server is shutting down"))
        self._waiting.clear()
        self._running.clear()

    def _admissible(self) -> list[Ticket]:
        """Waiting requests to start now, in order (call with the lock held): while a slot is free and the first
        one's memory fits beside the running requests' KV caches. A cancelled one is dropped."""
        out = []
        used = sum(r.ticket.need for r in self._running)
        while self._waiting and len(self._running) + len(out) < self.parallel:
            ticket = self._waiting[0]
            if ticket.cancelled:
                self._waiting.popleft()
                continue
            if used + ticket.need > self.capacity and (self._running or out):
                break  # queued until a running request ends
            out.append(self._waiting.popleft())
            used += ticket.need
        return out

    def _start(self, ticket: Ticket) -> None:
        """Prefill one request alone (or take its prompt from the cache) and give out its first token."""
        request, admitted = ticket.request, time.perf_counter()
        try:
            ids, types = self.session.processor.prompt_inputs(request.prompt)
            length = ids.shape[1]
            cache = KVCache(
                self.cfg.text, 1, length + request.sampling.max_new_tokens, self.dtype, self.session.model.device
            )
            key = (request.image_key, request.prompt)
            if key in self._prompts:
                k, v, logits = self._prompts[key]
                self._prompts.move_to_end(key)
                cache.k[:, :, :, :length], cache.v[:, :, :, :length] = k, v
                cached = "prompt"
            else:
                features, cached = self._features(request)
                logits = prefill(self.session.model, ids, types, features, cache).float().cpu()
                self._remember_prompt(key, cache, length, logits)
        except Exception as e:  # a failure of this request (a bad image mode): it alone ends
            ticket._put(Event(error=f"{type(e).__name__}: {e}"))
            return
        s = request.sampling
        generator = None if s.seed is None else torch.Generator().manual_seed(s.seed)
        token = int(sample_next_token(logits, generator, s.temperature, s.top_k, s.top_p)[0])
        now = time.perf_counter()
        running = _Running(ticket, cache, length, token, [], TextStream(self.session.processor.tokenizer),
                           StopText(request.stop), generator, admitted, now, cached)  # fmt: skip
        self.observer.first_token(now - ticket.submitted, length)
        self._running.append(running)
        self._take(running, token)

    def _features(self, request: Request) -> tuple[torch.Tensor, str]:
        if request.image_key in self._images:
            self._images.move_to_end(request.image_key)
            return self._images[request.image_key], "image"
        features = encode_image(self.session.model, self.session.processor.pixel_values(request.image))
        self._images[request.image_key] = features
        while len(self._images) > IMAGE_CACHE_ENTRIES:
            self._images.popitem(last=False)
        return features, "none"

    def _remember_prompt(self, key: tuple[str, str], cache: KVCache, length: int, logits: torch.Tensor) -> None:
        k, v = cache.k[:, :, :, :length].clone(), cache.v[:, :, :, :length].clone()
        self._prompts[key] = (k, v, logits)
        while sum(a.nbytes + b.nbytes for a, b, _ in self._prompts.values()) > PROMPT_CACHE_BYTES:
            self._prompts.popitem(last=False)

    def _step(self) -> None:
        """One decode step of every running request; each takes its next token."""
        rows = [r for r in self._running if r.done is None and not r.ticket.cancelled]
        if not rows:
            return
        t0 = time.perf_counter()
        try:
            logits = decode_rows(self.session.model, [r.token for r in rows], [r.cache for r in rows],
                                 [r.slot for r in rows]).float().cpu()  # fmt: skip
        except Exception as e:  # the model failed (a streamed layer that cannot be read): these requests end
            for r in rows:
                r.done = "error"
                r.ticket._put(Event(error=f"{type(e).__name__}: {e}"))
            return
        self.observer.batch(len(rows), time.perf_counter() - t0)
        for i, r in enumerate(rows):
            s = r.ticket.request.sampling
            r.slot += 1
            r.token = int(sample_next_token(logits[i : i + 1], r.generator, s.temperature, s.top_k, s.top_p)[0])
            self._take(r, r.token)

    def _take(self, r: _Running, token: int) -> None:
        """Record a sampled token, give out the text it completes, and decide whether the request is done."""
        r.ids.append(token)
        piece = r.stream.push(token)
        end = token in self.eos or len(r.ids) >= r.ticket.request.sampling.max_new_tokens
        if end:
            piece += r.stream.flush()
        out, stopped = r.stop.push(piece)
        if end and not stopped:
            out += r.stop.flush()
        if stopped or end:
            r.done = "stop" if stopped or token in self.eos else "length"
        if out:
            r.text.append(out)
            r.ticket._put(Event(text=out))
        if r.done is not None:
            self._finish(r)

    def _finish(self, r: _Running) -> None:
        t, now = r.ticket, time.perf_counter()
        queued, ttft, prefill_s = r.admitted - t.submitted, r.first - t.submitted, r.first - r.admitted
        result = Result(
            "".join(r.text), r.ids, t.prompt_tokens, r.done, queued, ttft, prefill_s, now - r.first, r.cached
        )
        self.observer.finished(result)
        t._put(Event(result=result))

    def _drop_finished(self) -> None:
        self._running = [r for r in self._running if r.done is None and not r.ticket.cancelled]
