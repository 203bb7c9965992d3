"""`lowmem-paligemma serve` through real clients: the official openai and ollama packages, and raw HTTP for what those
never send (broken bodies, huge bodies, hang-ups). One server for the session (tests/runtime/conftest.py): the tiny
PaliGemma 2 in float32, where "the same answer" is bit for bit."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import io
import json
import socket
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlparse

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import MODEL_ID, chat_body, data_uri, png_bytes, random_image
from PIL import Image

openai = pytest.importorskip("openai", reason="pip install openai (the dev extra)")
ollama = pytest.importorskip("ollama", reason="pip install ollama (the dev extra)")
httpx = pytest.importorskip("httpx", reason="pip install httpx (the dev extra)")
pytest.importorskip("fastapi", reason="the server needs its extra: pip install -e '.[serve]'")
parser = pytest.importorskip("prometheus_client.parser")

from lowmem_paligemma import SamplingOptions, run_prompt  # noqa: E402
from lowmem_paligemma.cli import main  # noqa: E402
from lowmem_paligemma.model.tasks import VQVAEDecoder, paste_mask  # noqa: E402

TIMEOUT_S = 30  # any one request
LONG = 4000  # new tokens that take this model ~14 s alone: a request that is still running when cancelled


def post(served, body: dict | str | bytes, path: str = "/v1/chat/completions", **kwargs) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(served.url + path, json=body, timeout=TIMEOUT_S, **kwargs)
    headers = {"Content-Type": "application/json"} | kwargs.pop("headers", {})
    return httpx.post(served.url + path, content=body, headers=headers, timeout=TIMEOUT_S, **kwargs)


def assert_healthy(served) -> None:
    assert httpx.get(served.url + "/health", timeout=TIMEOUT_S).json() == {"status": "ok", "model": MODEL_ID}


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def sse_text(lines: Iterable[str]) -> tuple[str, dict]:
    """The streamed text and the final chunk of an OpenAI event stream."""
    pieces, final = [], None
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            pieces.append(chunk["choices"][0]["delta"].get("content") or "")
            if chunk["choices"][0]["finish_reason"]:
                final = chunk
    return "".join(pieces), final


# --- the official clients ------------------------------------------------------------------------------------------


def test_openai_chat_streamed_and_not_equals_the_cli(served, tiny_pg2_dir, tmp_path):
    path = tmp_path / "scene.png"
    random_image(1).save(path)
    cli = CliRunner().invoke(main, ["generate", str(tiny_pg2_dir), str(path), "caption en", "--max-new-tokens", "12",
                                    "--dtype", "float32"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    want = cli.stdout.removesuffix("\n")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    messages = chat_body("caption en", data_uri(path.read_bytes()))["messages"]

    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, stream=True))

    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert want and streamed == whole.choices[0].message.content == want
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    prompt_tokens = served.session.processor.prompt_inputs("caption en")[0].shape[1]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 12)
    assert chunks[-1].usage.completion_tokens == 12
    timings = whole.choices[0].message.model_extra["paligemma"]["timings"]
    assert timings["ttft_s"] > 0 and "detections" not in whole.choices[0].message.model_extra["paligemma"]
    assert [m.id for m in client.models.list()] == [MODEL_ID] and client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_ollama_generate_and_chat_streamed_and_not(served):
    data = png_bytes(random_image(2))
    client = ollama.Client(host=served.url, timeout=TIMEOUT_S)
    options = {"num_predict": 10, "temperature": 0}

    whole = client.generate(model=MODEL_ID, prompt="caption en", images=[data], options=options)
    parts = list(client.generate(model=MODEL_ID, prompt="caption en", images=[data], options=options, stream=True))
    chat = client.chat(model=f"{MODEL_ID}:latest", messages=[{"role": "user", "content": "caption en",
                                                              "images": [data]}], options=options)  # fmt: skip

    openai_answer = post(served, chat_body("caption en", data_uri(data), max_tokens=10)).json()
    assert whole.response and "".join(p.response for p in parts) == whole.response == chat.message.content
    assert whole.response == openai_answer["choices"][0]["message"]["content"]
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    final = parts[-1]
    prompt_tokens = served.session.processor.prompt_inputs("caption en")[0].shape[1]
    for done in (whole, final, chat):
        assert (done.done_reason, done.eval_count, done.prompt_eval_count) == ("length", 10, prompt_tokens)
        assert done.total_duration >= done.eval_duration > 0 and done.load_duration == 0
    # The client's models drop fields they do not know: the extension field, read raw.
    raw = post(served, {"model": MODEL_ID, "prompt": "caption en", "images": [base64.b64encode(data).decode()],
                        "options": options, "stream": False}, "/api/generate").json()  # fmt: skip
    assert raw["response"] == whole.response and raw["paligemma"]["timings"]["ttft_s"] > 0
    assert [m.model for m in client.list().models] == [MODEL_ID]
    assert httpx.get(served.url + "/api/version").json()["version"]


# --- many clients, and clients that go away ------------------------------------------------------------------------


def test_eight_clients_get_their_answers_alone_and_a_hang_up_disturbs_none(served):
    session = served.session
    images = [random_image(10 + i, (32 + 4 * i, 24 + i)) for i in range(8)]
    prompts = ["caption en", "ocr", "answer en what is it?", "detect cat"] * 2
    tokens = [12, 20, 8, 16, 5, 14, 9, 18]
    alone = [run_prompt(session, session.encode(image), prompt, SamplingOptions(max_new_tokens=n)).text
             for image, prompt, n in zip(images, prompts, tokens)]  # fmt: skip

    async def ask(client: httpx.AsyncClient, i: int) -> str:
        body = chat_body(prompts[i], data_uri(png_bytes(images[i])), max_tokens=tokens[i], stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            return sse_text([line async for line in response.aiter_lines()])[0]

    async def hang_up(client: httpx.AsyncClient) -> None:
        body = chat_body("caption en", data_uri(png_bytes(random_image(99))), max_tokens=LONG, stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.aiter_lines()
            for _ in range(6):  # a few tokens in: it is running with the others
                await lines.__anext__()
        # leaving the block closes the connection mid-stream

    async def everyone() -> list[str]:
        async with httpx.AsyncClient(base_url=served.url, timeout=TIMEOUT_S) as client:
            return (await asyncio.gather(hang_up(client), *(ask(client, i) for i in range(8))))[1:]

    assert asyncio.run(asyncio.wait_for(everyone(), TIMEOUT_S)) == alone
    # The hung-up request would decode for ~14 s more: it left the batch at once.
    assert wait_until(lambda: served.state.engine.running == 0, 2.0)
    t0 = time.monotonic()
    response = post(served, chat_body("caption en", data_uri(png_bytes(images[0])), max_tokens=4))
    assert response.status_code == 200 and time.monotonic() - t0 < 5


def test_a_client_that_hangs_up_before_a_whole_answer_is_cancelled(served):
    body = json.dumps(chat_body("ocr", data_uri(png_bytes(random_image(3))), max_tokens=LONG)).encode()
    host, port = urlparse(served.url).hostname, urlparse(served.url).port
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        assert wait_until(lambda: served.state.engine.running == 1, 5.0)
    assert wait_until(lambda: served.state.engine.running == 0, 2.0)  # not ~14 s later
    assert_healthy(served)


# --- bad input: a clear 4xx each, and the server healthy after ----------------------------------------------------


def _bomb() -> bytes:
    # 8000 x 8000 = 64 megapixels of one bit each: 8 KB of PNG that would decode to 64 MB (192 MB as RGB)
    return png_bytes(Image.new("1", (8000, 8000)))


def _symlink_out(served) -> str:
    outside = served.media_dir.parent / "outside.png"
    random_image(4).save(outside)
    link = served.media_dir / "link.png"
    if not link.exists():
        link.symlink_to(outside)
    return "link.png"


GOOD = png_bytes(random_image(5))
# (name, path, body (a dict, raw text, or a function of the server), status, part of the message)
BAD = [
    ("malformed json", "/v1/chat/completions", '{"model": "tiny-pg2", "messages": [', 400, "not valid JSON"),
    ("a form post", "/v1/chat/completions", lambda s: ("form", json.dumps(chat_body("ocr", data_uri(GOOD)))), 400,
     "Content-Type: application/json"),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL_ID, "messages": "caption en"}, 400, "messages"),
    ("temperature a string", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD), temperature="hot"), 400,
     "temperature"),
    ("max_tokens a bool", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD), max_tokens=True), 400,
     "max_tokens"),
    ("audio content", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     400, "input_audio"),
    ("unknown model", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD)) | {"model": "gpt-4o"}, 404,
     "'gpt-4o' does not exist"),
    ("no image", "/v1/chat/completions", chat_body("caption en", None), 400, "needs an image"),
    ("remote url", "/v1/chat/completions", chat_body("ocr", "https://example.com/cat.png"), 400,
     "no outbound requests"),
    ("dot-dot", "/v1/chat/completions", chat_body("ocr", "../outside.png"), 400, "outside the media directory"),
    ("absolute path", "/v1/chat/completions", chat_body("ocr", "/etc/hostname"), 400, "outside the media directory"),
    ("file url outside", "/v1/chat/completions", chat_body("ocr", "file:///etc/hostname"), 400,
     "outside the media directory"),
    ("symlink out", "/v1/chat/completions", lambda s: chat_body("ocr", _symlink_out(s)), 400,
     "outside the media directory"),
    ("missing file", "/v1/chat/completions", chat_body("ocr", "nothing.png"), 400, "no such file"),
    ("truncated image", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD[: len(GOOD) // 2])), 400,
     "not a readable image"),
    ("not an image", "/v1/chat/completions", chat_body("ocr", data_uri(b"hello, world")), 400,
     "not a readable image"),
    ("bomb image", "/v1/chat/completions", lambda s: chat_body("ocr", data_uri(_bomb())), 400, "more pixels"),
    ("bad base64", "/v1/chat/completions", chat_body("ocr", "data:image/png;base64,@@@@"), 400, "not valid base64"),
    ("max_tokens 10**6", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD), max_tokens=10**6), 400,
     "over the model's context of 8192"),
    ("max_tokens 0", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD), max_tokens=0), 400,
     "max_tokens must be an integer >= 1"),
    ("top_p 1.5", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD), top_p=1.5), 400, "top_p"),
    ("n 2", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD), n=2), 400, "n must be 1"),
    ("too many stops", "/v1/chat/completions", chat_body("ocr", data_uri(GOOD), stop=["x"] * 20), 400, "stop"),
    ("<image> typed", "/v1/chat/completions", chat_body("caption <image> en", data_uri(GOOD)), 400,
     "must not contain <image>"),
    ("empty prompt", "/v1/chat/completions", chat_body("  ", data_uri(GOOD)), 400, "the prompt is empty"),
    ("unknown route", "/v1/completions", {}, 404, "no such endpoint"),
    ("ollama no image", "/api/generate", {"model": MODEL_ID, "prompt": "caption en"}, 400, "needs an image"),
    ("ollama bad base64", "/api/generate", {"model": MODEL_ID, "prompt": "ocr", "images": ["%%%"]}, 400,
     "not valid base64"),
    ("ollama num_predict -1", "/api/generate",
     {"model": MODEL_ID, "prompt": "ocr", "images": [base64.b64encode(GOOD).decode()], "options": {"num_predict": -1}},
     400, "num_predict must be >= 1"),
    ("ollama unknown model", "/api/chat", {"model": "llava", "messages": []}, 404, "model 'llava' not found"),
    ("ollama format", "/api/generate",
     {"model": MODEL_ID, "prompt": "ocr", "images": [base64.b64encode(GOOD).decode()], "format": "json"}, 400,
     "format is not supported"),
    ("ollama malformed json", "/api/generate", "{", 400, "not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "path", "body", "status", "message"), BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_one_clear_error(served, name, path, body, status, message):
    body = body(served) if callable(body) else body
    if isinstance(body, tuple):  # ("form", text): JSON posted as a form
        response = post(served, body[1], path, headers={"Content-Type": "application/x-www-form-urlencoded"})
    else:
        response = post(served, body, path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and message in error
    else:
        assert message in error["message"] and error["type"] and error["code"]
        assert "\n" not in error["message"]
    assert_healthy(served)


def test_a_wrong_method_is_405_in_the_same_shape(served):
    response = httpx.get(served.url + "/v1/chat/completions", timeout=TIMEOUT_S)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def _raw(served, head: str, chunks: Iterable[bytes]) -> tuple[int, dict]:
    """Send a request by hand (head, then body chunks as far as the server takes them); its status and JSON."""
    host, port = urlparse(served.url).hostname, urlparse(served.url).port
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the server answered and closed: read what it said
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_a_bug_is_a_500_in_the_same_shape(served, monkeypatch):
    from lowmem_paligemma.runtime.server import jobs

    def broken(*args: object) -> dict:
        raise KeyError("a bug")

    monkeypatch.setattr(jobs, "extension", broken)
    response = post(served, chat_body("ocr", data_uri(GOOD), max_tokens=2))
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal error (KeyError); see the server's log",
                                         "type": "server_error", "code": "internal_error", "param": None}  # fmt: skip
    assert_healthy(served)


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    limit = served.state.config.max_body
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # 100 MB announced: refused on Content-Length, before one byte of it is sent.
    status, body = _raw(served, head + "Content-Length: 100000000\r\n\r\n", [])
    assert status == 413 and f"limit of {limit:,} bytes" in body["error"]["message"]
    # Chunked (no length said): counted as it arrives, refused once past the limit.
    mb = b"x" * 10**6
    status, body = _raw(served, head + "Transfer-Encoding: chunked\r\n\r\n",
                        (b"%x\r\n%s\r\n" % (len(mb), mb) for _ in range(limit // 10**6 + 5)))  # fmt: skip
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert_healthy(served)


def test_a_full_queue_is_503_with_retry_after(served):
    engine = served.state.engine
    saved = engine.parallel, engine.max_queue
    engine.parallel, engine.max_queue = 1, 0  # one request at a time, none waiting
    body = chat_body("caption en", data_uri(png_bytes(random_image(6))), max_tokens=LONG, stream=True)
    try:
        with httpx.Client(base_url=served.url, timeout=TIMEOUT_S) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as running:
                lines = running.iter_lines()  # kept: a dropped iterator closes the connection
                next(lines)
                # Running, not only admitted: while it is prefilled the engine counts it neither waiting nor running.
                assert wait_until(lambda: engine.running == 1, 5.0)
                refused = client.post("/v1/chat/completions", json=body | {"stream": False})
    finally:
        engine.parallel, engine.max_queue = saved
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["code"] == "server_busy"
    assert wait_until(lambda: engine.running == 0, 2.0)
    assert_healthy(served)


def test_a_request_that_could_never_fit_in_memory_is_400(served, monkeypatch):
    monkeypatch.setattr(served.state.engine, "capacity", 1000)  # bytes left for requests beside the model
    response = post(served, chat_body("ocr", data_uri(GOOD), max_tokens=8))
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "insufficient_memory"
    assert "ask for fewer tokens" in error["message"]


def test_an_api_key_is_asked_for_and_checked(served):
    config = served.state.config
    served.state.config = dataclasses.replace(config, api_key="sekret")
    body = chat_body("ocr", data_uri(GOOD), max_tokens=3)
    try:
        missing = post(served, body)
        wrong = post(served, body, headers={"Authorization": "Bearer guess"})
        ollama_missing = post(served, {"model": MODEL_ID}, "/api/generate")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.url + "/v1", api_key="guess", max_retries=0).models.list()
        right = openai.OpenAI(base_url=served.url + "/v1", api_key="sekret", max_retries=0, timeout=TIMEOUT_S)
        answer = right.chat.completions.create(**body)
        assert httpx.get(served.url + "/health").status_code == 200  # probes need no key
        assert httpx.get(served.url + "/metrics").status_code == 401
    finally:
        served.state.config = config
    assert missing.status_code == wrong.status_code == ollama_missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key" and wrong.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["WWW-Authenticate"] == "Bearer" and "API key" in ollama_missing.json()["error"]
    assert answer.choices[0].message.content is not None


# --- the prompt and the image --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["caption en <eos>", "detect <loc0000><loc0001> cat", "<bos><pad> ocr",
                                    "answer en ＜image＞?", "<IMAGE> caption", "<ima ge> <seg012>"])  # fmt: skip
def test_special_tokens_typed_in_a_prompt_cannot_touch_the_image_prefix(served, prompt):
    processor = served.session.processor
    ids = processor.prompt_inputs(prompt)[0][0].tolist()
    n, image_id = processor.num_image_tokens, processor.image_token_index
    assert ids[:n] == [image_id] * n and ids.count(image_id) == n and ids[n] == processor.bos_token_id
    image = random_image(7)
    response = post(served, chat_body(prompt, data_uri(png_bytes(image)), max_tokens=8))
    want = run_prompt(served.session, served.session.encode(image), prompt, SamplingOptions(max_new_tokens=8))
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == want.text


def test_images_under_the_media_dir_are_read_by_path_or_file_url(served):
    data = png_bytes(random_image(8))
    (served.media_dir / "sub").mkdir(exist_ok=True)
    (served.media_dir / "sub" / "cat.png").write_bytes(data)
    answers = {
        url: post(served, chat_body("caption en", url, max_tokens=6)).json()["choices"][0]["message"]["content"]
        for url in (data_uri(data), "sub/cat.png", "sub/../sub/cat.png", f"file://{served.media_dir}/sub/cat.png")
    }
    assert len(set(answers.values())) == 1, answers


# --- detect and segment: the paligemma field ---------------------------------------------------------------------

SEG = "".join(f"<seg{i:03d}>" for i in range(0, 128, 8))
DETECTIONS = f"<loc0256><loc0128><loc0768><loc0512> cat ; <loc0000><loc0000><loc0512><loc0512>{SEG} dog"
SIZE = (320, 200)
# x = bin / 1024 * 320, y = bin / 1024 * 200, rounded: what a client draws on the 320 x 200 image it sent
BOXES = {"cat": [40, 50, 160, 150], "dog": [0, 0, 160, 100]}


def test_detections_and_masks_in_pixels_of_the_sent_image(served, forced):
    forced(DETECTIONS)
    data = png_bytes(random_image(9, SIZE))
    whole = post(served, chat_body("segment cat ; dog", data_uri(data), max_tokens=64)).json()
    body = chat_body("segment cat ; dog", data_uri(data), max_tokens=64, stream=True)
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S) as r:
        text, final = sse_text(r.iter_lines())
    lines = post(served, {"model": MODEL_ID, "prompt": "detect cat ; dog", "images": [base64.b64encode(data).decode()],
                          "options": {"num_predict": 64}}, "/api/generate").text.splitlines()  # fmt: skip

    message = whole["choices"][0]["message"]
    assert message["content"] == text == DETECTIONS  # the text is the model's, untouched
    found = message["paligemma"]["detections"]
    assert found == final["paligemma"]["detections"] == json.loads(lines[-1])["paligemma"]["detections"]
    assert [(d["label"], d["box"]) for d in found] == list(BOXES.items())
    cat, dog = found
    assert cat["mask"] is None  # a detect-style object: no <seg> codes
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(dog["mask"]))))
    assert mask.shape == (SIZE[1], SIZE[0]) and not mask[100:].any() and not mask[:, 160:].any()
    vae = VQVAEDecoder.from_npz(served.vae)
    soft = paste_mask(vae.decode_masks([list(range(0, 128, 8))])[0], tuple(BOXES["dog"]), *SIZE)
    assert np.array_equal(mask, (soft * 255).round().astype(np.uint8)) and mask.any()


# --- metrics, and a server still loading -----------------------------------------------------------------------------


def _metrics(served) -> dict[tuple[str, tuple], float]:
    text = httpx.get(served.url + "/metrics", timeout=TIMEOUT_S).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_parse_as_prometheus_text_and_count_the_requests(served):
    ok = ("lowmem_http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    bad = ("lowmem_http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "400")))
    before = _metrics(served)
    answer = post(served, chat_body("caption en", data_uri(GOOD), max_tokens=7)).json()
    post(served, chat_body("caption en", None))
    after = _metrics(served)
    assert after[ok] - before.get(ok, 0) == 1 and after[bad] - before.get(bad, 0) == 1
    generated = ("lowmem_generated_tokens_total", ())
    assert after[generated] - before.get(generated, 0) == answer["usage"]["completion_tokens"] == 7
    ttft = ("lowmem_time_to_first_token_seconds_count", ())
    assert after[ttft] - before.get(ttft, 0) == 1
    assert after[("lowmem_rss_bytes", ())] > 0 and after[("lowmem_queue_depth", ())] == 0
    assert ("lowmem_running_requests", ()) in after and ("lowmem_batch_size_count", ()) in after
    assert ("lowmem_time_per_output_token_seconds_count", ()) in after


def test_health_and_requests_say_503_while_the_model_loads():
    from fastapi.testclient import TestClient

    from lowmem_paligemma.runtime.server.app import create_app
    from lowmem_paligemma.runtime.server.config import ServerConfig
    from lowmem_paligemma.runtime.server.state import ServerState

    with TestClient(create_app(ServerState("loading-model", ServerConfig()))) as client:
        health = client.get("/health")
        chat = client.post("/v1/chat/completions", json=chat_body("ocr", data_uri(GOOD)) | {"model": "loading-model"})
        tags = client.get("/api/tags")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "loading" and "Retry-After" in chat.headers
    assert tags.status_code == 503 and "loading" in tags.json()["error"]


def test_the_page_is_served(served):
    response = httpx.get(served.url + "/", timeout=TIMEOUT_S)
    assert response.status_code == 200 and 'id="image-input"' in response.text
