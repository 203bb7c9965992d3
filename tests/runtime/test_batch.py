"""The batch results file: what counts as done under which prompt and settings, whole lines only, and a batch of
images answered together as each would be alone."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from lowmem_paligemma import LoadOptions, SamplingOptions, load_session, run_prompt
from lowmem_paligemma.runtime.batch import (
    IMAGE_SUFFIXES,
    BatchJob,
    answer_batch,
    drop_torn_tail,
    list_image_paths,
    list_images,
    open_results,
    plan_run,
    prepare_image,
    read_records,
)

JOB = BatchJob.of("models/tiny", "caption en", SamplingOptions(max_new_tokens=6), LoadOptions(dtype="float32"))


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_settings_hold_what_changes_the_answer_and_pass_new_load_fields_through():
    assert JOB.settings == {"model": "tiny", "max_new_tokens": 6, "temperature": 0.0, "top_k": None, "top_p": None,
                            "seed": None, "dtype": "float32", "quantize": None, "kernels": None}  # fmt: skip
    for how in (
        {"device": "cuda", "preflight": False},
        {"zero_copy": True},
        {"max_memory": 10**9, "prefetch": False},
        {"requests": 1},
    ):
        same = BatchJob.of("tiny", "caption en", SamplingOptions(max_new_tokens=6), LoadOptions("float32", **how))
        assert same.key("/a.png") == JOB.key("/a.png")  # how the model runs is not part of the answer

    @dataclass(frozen=True)
    class Extended(LoadOptions):  # a load option added later reaches the settings without a change here
        speculate: str | None = None

    job = BatchJob.of("tiny", "caption en", SamplingOptions(max_new_tokens=6), Extended("float32", speculate="yes"))
    assert job.settings["speculate"] == "yes" and job.key("/a.png") != JOB.key("/a.png")
    q8 = BatchJob.of("tiny", "caption en", SamplingOptions(max_new_tokens=6), LoadOptions("float32", quantize="int8"))
    assert q8.key("/a.png") != JOB.key("/a.png")


def test_plan_keys_on_path_prompt_and_settings_and_retries_failures(tmp_path):
    results = tmp_path / "r.jsonl"
    paths = ["/i/a.png", "/i/b.png", "/i/c.png", "/i/d.png", "/i/e.png"]
    other = BatchJob("answer en what?", JOB.settings)
    _write(results, [
        JOB.head("/i/a.png") | {"output": "x"},  # done
        JOB.head("/i/b.png") | {"error": "bad"},  # failed: retried
        other.head("/i/c.png") | {"output": "y"},  # another prompt: done again
        JOB.head("/i/d.png") | {"error": "bad"}, JOB.head("/i/d.png") | {"output": "z"},  # failed, then answered
        BatchJob(JOB.prompt, JOB.settings | {"seed": 1}).head("/i/e.png") | {"output": "w"},  # other settings
        {"image": "e.png", "prompt": "caption en", "output": "old"},  # a line without path or settings
        [1, 2],
    ], tail='{"image": "c.p')  # fmt: skip
    plan = plan_run(paths, JOB, results)
    assert plan.todo == ["/i/b.png", "/i/c.png", "/i/e.png"]
    assert (plan.answered, plan.retried, plan.other, plan.torn) == (2, 1, 2, True)
    text = plan.describe(len(paths), results)
    assert "2 already answered" in text and "1 failed before (retried)" in text and "another prompt" in text
    assert "half-written" in text and "3 to do" in text
    assert plan_run(paths, JOB, tmp_path / "none.jsonl").todo == paths


def test_a_torn_last_line_is_cut_and_appends_are_whole_lines(tmp_path):
    results = tmp_path / "sub" / "r.jsonl"
    assert drop_torn_tail(results) == 0
    with open_results(results) as out:
        out.write([{"image": "a.png"}, {"image": "b.png", "output": "é"}])
    with results.open("a") as f:
        f.write('{"image": "c.p')  # killed mid-line
    assert len(list(read_records(results))) == 2
    with open_results(results) as out:
        assert out.dropped == len('{"image": "c.p')
        out.write([{"image": "d.png"}])
    lines = results.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["image"] for line in lines] == ["a.png", "b.png", "d.png"]
    results.write_text('{"image": "only half')  # a file that is all torn line
    assert drop_torn_tail(results) > 0 and results.read_text() == ""


def test_list_images_by_suffix_only_files(tmp_path):
    for name in ("b.JPG", "a.png", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]
    assert ".gif" in IMAGE_SUFFIXES
    assert list_image_paths(str(tmp_path)) == [str(tmp_path / n) for n in ("a.png", "b.JPG", "c.webp")]
    pytest.importorskip("pyarrow", reason="URI listing uses pyarrow, installed with the ray extra")
    assert list_image_paths(tmp_path.as_uri()) == [f"file://{tmp_path}/{n}" for n in ("a.png", "b.JPG", "c.webp")]


def test_a_batch_is_answered_as_each_image_alone(tiny_pg2_dir, tmp_path):
    session = load_session(tiny_pg2_dir, LoadOptions(dtype="float32"))
    rng = np.random.default_rng(1)
    paths = []
    for i, size in enumerate([(40, 30), (20, 20), (64, 16)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    items = [(p, prepare_image(session.processor, p)) for p in paths[:2]]
    items.append((str(tmp_path / "bad.png"), prepare_image(session.processor, str(tmp_path / "bad.png"))))
    items.append((paths[2], prepare_image(session.processor, paths[2], (tmp_path / "2.png").read_bytes())))
    assert isinstance(items[2][1], str) and isinstance(items[3][1], torch.Tensor)
    sampling = SamplingOptions(max_new_tokens=6)
    records = answer_batch(session, JOB, sampling, items)
    assert [r["image"] for r in records] == ["0.png", "1.png", "bad.png", "2.png"]
    assert records[2] == JOB.head(str(tmp_path / "bad.png")) | {"error": items[2][1]}
    assert "bad.png: not a readable image" in records[2]["error"]
    for record, path in zip([records[i] for i in (0, 1, 3)], paths):
        alone = run_prompt(session, session.encode(Image.open(path)), JOB.prompt, sampling)
        assert record["output"] == alone.text and record["tokens"] == len(alone.token_ids) > 0
        assert record["batch"] == 3 and record["seconds"] > 0 and record["path"] == path
