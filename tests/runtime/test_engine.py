"""The server's engine: many requests decoded together, each equal to itself alone; stops, cancels, caches and
limits (a tiny PaliGemma 2 in float32, so "equal" is bit for bit)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from PIL import Image

from lowmem_paligemma import ContextLengthError, InsufficientMemoryError, LoadOptions, SamplingOptions, load_session
from lowmem_paligemma.runtime.server import engine as engine_module
from lowmem_paligemma.runtime.server.engine import Busy, Engine, Request, ShuttingDown, StopText
from lowmem_paligemma.runtime.session import run_prompt


@pytest.fixture(scope="module")
def session(tiny_pg2_dir):
    return load_session(tiny_pg2_dir, LoadOptions(dtype="float32"))


def _image(seed: int) -> tuple[Image.Image, str]:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(24, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    return image, hashlib.sha256(image.tobytes()).hexdigest()


async def _collect(ticket):
    pieces, result, error = [], None, None
    async for event in ticket.events():
        pieces.append(event.text)
        result, error = event.result, event.error
    return "".join(pieces), result, error


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_many_requests_together_equal_each_alone(session):
    prompts = ["caption en", "detect cat ; dog", "answer en what is this?", "ocr"]
    samplings = [SamplingOptions(max_new_tokens=14), SamplingOptions(max_new_tokens=9, temperature=1.3, seed=4),
                 SamplingOptions(max_new_tokens=20, temperature=0.8, top_k=50, seed=9),
                 SamplingOptions(max_new_tokens=6)]  # fmt: skip
    requests = [Request(*_image(i), prompts[i % 4], samplings[i % 4]) for i in range(8)]
    alone = [run_prompt(session, session.encode(r.image), r.prompt, r.sampling) for r in requests]
    batches = []

    class Watch:
        def batch(self, size, seconds):
            batches.append(size)

        def first_token(self, seconds, prompt_tokens):
            pass

        def finished(self, result):
            pass

    engine = Engine(session, parallel=8, max_queue=8, observer=Watch())
    engine.start()

    async def main():
        tickets = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(_collect(t) for t in tickets))

    try:
        got = _run(main())
    finally:
        engine.stop()
    for (text, result, error), want in zip(got, alone):
        assert error is None and result.token_ids == want.token_ids  # the same tokens as alone, bit for bit
        assert text == result.text == want.text  # streamed pieces add up to the answer
        eos = want.token_ids[-1] in session.model.cfg.eos_token_ids
        assert result.finish_reason == ("stop" if eos else "length")
    assert max(batches) > 1  # they really were decoded together


def test_stop_strings_cut_the_text_and_stop(session):
    image, key = _image(1)
    alone = run_prompt(session, session.encode(image), "caption en", SamplingOptions(max_new_tokens=30))
    stop = alone.text[len(alone.text) // 2 : len(alone.text) // 2 + 3]
    assert stop and stop in alone.text
    engine = Engine(session, parallel=2)
    engine.start()
    try:
        text, result, _ = _run(
            _collect_after_submit(engine, Request(image, key, "caption en", SamplingOptions(30), (stop,)))
        )
    finally:
        engine.stop()
    assert text == result.text == alone.text[: alone.text.index(stop)] and result.finish_reason == "stop"
    assert len(result.token_ids) < len(alone.token_ids)


async def _collect_after_submit(engine, request):
    return await _collect(engine.submit(request))


@pytest.mark.parametrize(
    "stops, pieces, out",
    [
        (("END",), ["ab", "cE", "N", "Dxx"], ["ab", "c", "", ""]),  # "E", "EN" held back until they are not a stop
        (("END",), ["abE", "Nq"], ["ab", "ENq"]),
        (("x", "yz"), ["ay", "zb"], ["a", ""]),
    ],
)
def test_stop_text_holds_back_what_may_become_a_stop(stops, pieces, out):
    stop = StopText(stops)
    got = [stop.push(p)[0] for p in pieces]
    assert got == out


def test_a_cancelled_request_frees_its_slot_and_the_others_go_on(session):
    image, key = _image(2)
    others = [Request(*_image(10 + i), "caption en", SamplingOptions(max_new_tokens=12)) for i in range(2)]
    alone = [run_prompt(session, session.encode(r.image), r.prompt, r.sampling) for r in others]
    engine = Engine(session, parallel=3)
    engine.start()

    async def main():
        hang_up = engine.submit(Request(image, key, "caption en", SamplingOptions(max_new_tokens=200)))
        tickets = [engine.submit(r) for r in others]
        async for event in hang_up.events():  # read one piece, then the client goes away
            if event.text:
                break
        hang_up.cancel()
        got = await asyncio.gather(*(_collect(t) for t in tickets))
        for _ in range(200):  # freed within a step
            if engine.running == 0:
                break
            await asyncio.sleep(0.01)
        return got, engine.running

    try:
        got, running = _run(main())
    finally:
        engine.stop()
    assert [r.token_ids for _, r, _ in got] == [a.token_ids for a in alone] and running == 0


def test_limits_before_any_work(session, monkeypatch):
    image, key = _image(3)
    engine = Engine(session, parallel=1, max_queue=1)  # not started: nothing runs, the queue fills

    async def main():
        with pytest.raises(ContextLengthError):
            engine.submit(Request(image, key, "caption en", SamplingOptions(max_new_tokens=10**6)))
        engine.submit(Request(image, key, "caption en"))
        engine.submit(Request(image, key, "caption en"))  # one running slot + one queued
        with pytest.raises(Busy):
            engine.submit(Request(image, key, "caption en"))
        small = Engine(session)
        small.capacity = 1000
        with pytest.raises(InsufficientMemoryError, match="ask for fewer tokens"):
            small.submit(Request(image, key, "caption en"))

    _run(main())
    engine.stop()

    async def after():
        with pytest.raises(ShuttingDown):
            engine.submit(Request(image, key, "caption en"))

    _run(after())


def test_memory_admits_what_fits_and_queues_the_rest(session):
    requests = [Request(*_image(20 + i), "caption en", SamplingOptions(max_new_tokens=8)) for i in range(3)]
    engine = Engine(session, parallel=3)
    one = engine_module.request_bytes(session.model.cfg, 4 + session.model.cfg.num_image_tokens, 8, torch.float32).total
    engine.capacity = int(one * 1.5)  # room for one request at a time
    seen = []

    class Watch:
        def batch(self, size, seconds):
            seen.append(size)

        def first_token(self, seconds, prompt_tokens):
            pass

        def finished(self, result):
            pass

    engine.observer = Watch()
    engine.start()

    async def main():
        return await asyncio.gather(*(_collect(engine.submit(r)) for r in requests))

    try:
        got = _run(main())
    finally:
        engine.stop()
    assert all(error is None for _, _, error in got) and seen and max(seen) == 1  # one at a time, all answered


def test_the_same_image_and_prompt_come_from_the_caches(session):
    image, key = _image(5)
    engine = Engine(session, parallel=2)
    engine.start()

    async def main():
        first = await _collect(engine.submit(Request(image, key, "caption en", SamplingOptions(10))))
        other = await _collect(engine.submit(Request(image, key, "answer en what?", SamplingOptions(10))))
        again = await _collect(engine.submit(Request(image, key, "caption en", SamplingOptions(10))))
        return first, other, again

    try:
        first, other, again = _run(main())
    finally:
        engine.stop()
    alone = run_prompt(session, session.encode(image), "answer en what?", SamplingOptions(10))
    assert first[1].cached == "none" and other[1].cached == "image" and again[1].cached == "prompt"
    assert again[1].token_ids == first[1].token_ids and other[1].token_ids == alone.token_ids


def test_stop_ends_waiting_and_running_requests(session):
    engine = Engine(session, parallel=1, max_queue=4)
    engine.start()

    async def main():
        tickets = [engine.submit(Request(*_image(30 + i), "caption en", SamplingOptions(max_new_tokens=200)))
                   for i in range(3)]  # fmt: skip
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        return await asyncio.gather(*(_collect(t) for t in tickets))

    got = _run(main())
    assert any(error == "the server is shutting down" for _, _, error in got)
    assert all(result is not None or error is not None for _, result, error in got)
