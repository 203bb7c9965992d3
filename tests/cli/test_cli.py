"""CLI through CliRunner on tiny checkpoints: every command runs, outputs equal the library's, errors are one line."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from lowmem_paligemma import defaults
from lowmem_paligemma.checkpoint import preflight
from lowmem_paligemma.checkpoint.safetensors_io import read_checkpoint
from lowmem_paligemma.cli import files as cli_files
from lowmem_paligemma.cli import main
from lowmem_paligemma.model.config import PRESETS
from lowmem_paligemma.model.generate import generate
from lowmem_paligemma.model.paligemma import PaliGemmaForConditionalGeneration
from lowmem_paligemma.model.processor import Processor
from lowmem_paligemma.model.tasks import write_synthetic_vae_npz
from lowmem_paligemma.pretrained.load import load_model
from lowmem_paligemma.pretrained.synth import tiny_checkpoint
from lowmem_paligemma.profiling.profiler import Timeline
from lowmem_paligemma.runtime import session as session_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: object, input: str | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_user_error(result: Result) -> str:
    """Non-zero exit through SystemExit, no traceback, exactly one `Error:` line on stderr; returns that line."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    a = d / "a.png"  # 64 x 32: loc bins map to whole pixels (1024 bins / 16 = 64 / 1 = ...)
    Image.fromarray((rng.random((32, 64, 3)) * 255).astype(np.uint8)).save(a)
    b = d / "b.png"
    gradient = np.linspace(0, 255, 48 * 48 * 3).reshape(48, 48, 3)
    Image.fromarray(255 - gradient.astype(np.uint8)).save(b)
    bad = d / "bad.png"
    bad.write_text("this is not an image\n")
    return {"a": a, "b": b, "bad": bad}


@pytest.fixture(scope="module")
def vae_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_vae_npz(tmp_path_factory.mktemp("vae") / "vae-oid.npz")


def library_answer(model_dir: Path, image: Path, prompt: str, dtype: torch.dtype, **sampling) -> tuple[list[int], str]:
    """What the library gives without the CLI: load, process, generate from pixel values, decode."""
    model = load_model(model_dir, dtype=dtype).model
    processor = Processor.from_pretrained(model_dir)
    x = processor(image, prompt)
    ids = list(generate(model, x["input_ids"], x["token_type_ids"], pixel_values=x["pixel_values"], **sampling))
    return ids, processor.decode(ids)


class EncodeCounter:
    """Counts vision-tower runs, whichever path (encode_image or forward with pixel values) triggers them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = PaliGemmaForConditionalGeneration.encode_image

        def counting(model: PaliGemmaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return original(model, pixel_values)

        monkeypatch.setattr(PaliGemmaForConditionalGeneration, "encode_image", counting)


# --- generate -------------------------------------------------------------------------------------------------------


def test_generate_streams_text_and_reports_on_stderr(tiny_pg1_dir, images):
    result = ok(run("generate", tiny_pg1_dir, images["a"], "caption en", "--max-new-tokens", 8))
    assert result.stdout.strip()
    for word in ("loaded", "prefill", "tokens/s", "peak RSS", "anon", "file"):
        assert word in result.stderr
    assert "loaded" not in result.stdout and "peak RSS" not in result.stdout


@pytest.mark.parametrize("which", ["pg1", "pg2"])
@pytest.mark.parametrize(
    "options, sampling",
    [
        ([], {}),
        (["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "7"],
         {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 7}),
    ],
    ids=["greedy", "sampled"],
)  # fmt: skip
def test_generate_equals_library(which, options, sampling, tiny_pg1_dir, tiny_pg2_dir, images):
    model_dir = tiny_pg1_dir if which == "pg1" else tiny_pg2_dir
    prompt, n = "answer en what is in the picture?", 12
    ids, text = library_answer(model_dir, images["a"], prompt, torch.float32, max_new_tokens=n, **sampling)
    assert len(ids) > 1 and text  # a degenerate answer would prove nothing
    args = ["generate", model_dir, images["a"], prompt, "--dtype", "float32", "--max-new-tokens", n, *options]
    assert ok(run(*args)).stdout == text + "\n"
    record = json.loads(ok(run(*args, "--json")).stdout)
    assert (record["output"], record["tokens"], record["prompt"]) == (text, len(ids), prompt)
    assert record["peak_rss"] > 0 and record["load_s"] >= 0 and record["prefill_s"] > 0


@pytest.mark.parametrize(
    "which, prompt, options",
    [
        ("pg1", "caption en", []),
        ("pg2", "detect cat ; dog", []),
        ("pg1", "ocr", ["--temperature", "3", "--seed", "5"]),  # near-uniform sampling: many byte-fallback runs
        ("pg2", "answer en what is this?", ["--temperature", "1.5", "--seed", "2"]),
    ],
)
def test_streamed_answer_equals_the_json_output(which, prompt, options, tiny_pg1_dir, tiny_pg2_dir, images):
    # Long answers: the stream once printed 1,258 characters where --json gave 687 (a byte run re-decoded).
    model_dir = tiny_pg1_dir if which == "pg1" else tiny_pg2_dir
    args = ["generate", model_dir, images["a"], prompt, "--max-new-tokens", 300, *options]
    record = json.loads(ok(run(*args, "--json")).stdout)
    assert record["tokens"] > 50
    assert ok(run(*args)).stdout == record["output"] + "\n"


def test_sampling_options_change_the_output(tiny_pg1_dir, images):
    # Makes the sampled case above meaningful: the options reach the sampler.
    common = ["generate", tiny_pg1_dir, images["a"], "caption en", "--max-new-tokens", 12]
    greedy = ok(run(*common)).stdout
    sampled = ok(run(*common, "--temperature", "5", "--seed", "1")).stdout
    assert ok(run(*common, "--temperature", "5", "--seed", "1")).stdout == sampled
    assert sampled != greedy


def test_generate_uses_the_measured_default_dtype(tiny_pg2_dir, images):
    model = load_model(tiny_pg2_dir, dtype=defaults.DTYPE).model  # "auto" (the suite's reference kernels: bf16)
    chosen = str(model.dtype).removeprefix("torch.")
    _, text = library_answer(tiny_pg2_dir, images["b"], "caption en", model.dtype, max_new_tokens=10)
    assert ok(run("generate", tiny_pg2_dir, images["b"], "caption en", "--max-new-tokens", 10)).stdout == text + "\n"
    assert f"({chosen} on cpu)" in run("generate", tiny_pg2_dir, images["b"], "caption en").stderr
    record = json.loads(ok(run("generate", tiny_pg2_dir, images["b"], "caption en", "--json")).stdout)
    assert record["dtype"] == chosen and record["kernels"]["plan"]["dense"]["decode"] in ("linear", "mv")


def test_quantize_and_kernel_options_reach_the_model(tiny_pg1_dir, images):
    args = ["generate", tiny_pg1_dir, images["a"], "caption en", "--max-new-tokens", 4, "--json"]
    record = json.loads(ok(run(*args, "--quantize", "int8", "--kernels", "int8=int8pack/int_mm")).stdout)
    assert record["quantize"] == "int8" and record["kernels"]["plan"]["int8"] == {"decode": "int8pack",
                                                                                   "prefill": "int_mm"}  # fmt: skip
    line = assert_user_error(run(*args, "--kernels", "int8=fast/slow"))
    assert "kernel spec" in line and "int8pack" in line


def test_generate_loads_for_one_request(tiny_pg1_dir, images, monkeypatch):
    """One answer per load: the kernel choice charges a layout's reorder to that one request (LoadOptions.requests)."""
    seen = []
    real = session_module.load_model
    monkeypatch.setattr(session_module, "load_model", lambda path, options, **kw: seen.append(options) or real(
        path, options, **kw))  # fmt: skip
    ok(run("generate", tiny_pg1_dir, images["a"], "caption en", "--max-new-tokens", 2))
    assert [o.requests for o in seen] == [1]


def test_info_shows_the_machine_and_the_choices(tiny_pg1_dir):
    text = ok(run("info")).stdout
    assert "cpu" in text and "torch" in text and "kernel cache" in text
    record = json.loads(ok(run("info", tiny_pg1_dir, "--quantize", "int8", "--json")).stdout)
    assert record["quantize"] == "int8" and record["weight_bytes"] > 0 and "int8" in record["kernels"]["plan"]
    assert any(line.startswith("int8 kernels (decode/prefill):") for line in record["why"])


def test_max_memory_plans_and_prints_the_plan(tiny_pg1_dir, images):
    args = ["generate", tiny_pg1_dir, images["a"], "caption en", "--max-new-tokens", 4, "--dtype", "bfloat16"]
    plain = ok(run(*args))
    budgeted = ok(run(*args, "--max-memory", "64GB"))
    assert budgeted.stdout == plain.stdout
    assert (
        "memory budget 64.00 GB: planned peak" in budgeted.stderr and "decoder layers: all resident" in budgeted.stderr
    )
    line = assert_user_error(run(*args, "--max-memory", "10MB"))
    assert "memory budget 10.0 MB is below the minimum" in line and "--max-memory" in line
    assert "--max-memory" in assert_user_error(run(*args, "--max-memory", "64GB", "--zero-copy"))
    assert "not a size" in assert_user_error(run(*args, "--max-memory", "lots"))
    text = ok(run("info", tiny_pg1_dir, "--max-memory", "64GB")).stdout
    assert "memory budget 64.00 GB" in text and "always held" in text
    assert "below the minimum" in assert_user_error(run("info", tiny_pg1_dir, "--max-memory", "10MB"))


def _fixed_output(monkeypatch: pytest.MonkeyPatch, model_dir: Path, text: str) -> None:
    """Make the CLI's generate() yield the tokens of `text` + EOS: a known detect / segment answer."""
    tokenizer = Processor.from_pretrained(model_dir).tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [1]
    monkeypatch.setattr(session_module, "generate", lambda *args, **kwargs: iter(ids))


SEG = "".join(f"<seg{i:03d}>" for i in range(0, 128, 8))
DETECTIONS = f"<loc0256><loc0128><loc0768><loc0512> cat ; <loc0000><loc0000><loc0512><loc0512>{SEG} dog"


def test_draw_lists_boxes_in_pixels_and_writes_png(tiny_pg1_dir, images, vae_npz, tmp_path, monkeypatch):
    _fixed_output(monkeypatch, tiny_pg1_dir, DETECTIONS)
    out = tmp_path / "drawn.png"
    result = ok(run("generate", tiny_pg1_dir, images["a"], "segment cat ; dog", "--draw", out, "--vae", vae_npz))
    assert result.stdout.strip() == DETECTIONS
    # a.png is 64 x 32: x = bin / 1024 * 64, y = bin / 1024 * 32.
    assert "cat: (8, 8, 32, 24)" in result.stderr
    assert "dog: (0, 0, 32, 16) + mask" in result.stderr
    assert out.read_bytes().startswith(PNG_MAGIC)
    drawn, original = Image.open(out), Image.open(images["a"]).convert("RGB")
    assert drawn.size == original.size
    assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(original))

    record = json.loads(ok(run("generate", tiny_pg1_dir, images["a"], "segment x", "--draw", out, "--json")).stdout)
    assert [(d["label"], d["box"], d["mask"]) for d in record["detections"]] == [
        ("cat", [8, 8, 32, 24], False),
        ("dog", [0, 0, 32, 16], False),
    ]


def test_draw_without_vae_names_the_missing_masks(tiny_pg1_dir, images, tmp_path, monkeypatch):
    _fixed_output(monkeypatch, tiny_pg1_dir, DETECTIONS)
    result = ok(run("generate", tiny_pg1_dir, images["a"], "segment dog", "--draw", tmp_path / "x.png"))
    assert "--vae" in result.stderr and "+ mask" not in result.stderr


def test_draw_on_real_model_output(tiny_pg2_dir, images, tmp_path):
    out = tmp_path / "real.png"
    result = ok(run("generate", tiny_pg2_dir, images["b"], "detect cat", "--draw", out))
    assert re.search(r"\d+ object(s|\(s\)) drawn", result.stderr), result.stderr
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("how", ["same path", "another spelling", "symbolic link", "hard link"])
def test_draw_never_overwrites_the_input_image(how, tiny_pg1_dir, images, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(session_module, "load_model", lambda *a, **kw: loads.append(1))
    image = shutil.copy(images["a"], tmp_path / "in.png")
    before = image.read_bytes()
    target = {
        "same path": image,
        "another spelling": tmp_path / "sub" / ".." / "in.png",
        "symbolic link": tmp_path / "link.png",
        "hard link": tmp_path / "hard.png",
    }[how]
    (tmp_path / "sub").mkdir()
    if how == "symbolic link":
        target.symlink_to(image)
    if how == "hard link":
        target.hardlink_to(image)
    line = assert_user_error(run("generate", tiny_pg1_dir, image, "detect cat", "--draw", target))
    assert "input image" in line and image.read_bytes() == before and loads == []


def test_draw_creates_no_directory(tiny_pg1_dir, images, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(session_module, "load_model", lambda *a, **kw: loads.append(1))
    target = tmp_path / "no" / "such" / "dir" / "out.png"
    line = assert_user_error(run("generate", tiny_pg1_dir, images["a"], "detect cat", "--draw", target))
    assert "does not exist" in line and not (tmp_path / "no").exists() and loads == []


def test_draw_needs_a_detect_or_segment_prompt(tiny_pg1_dir, images, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(session_module, "load_model", lambda *a, **kw: loads.append(1))
    line = assert_user_error(run("generate", tiny_pg1_dir, images["a"], "caption en", "--draw", tmp_path / "x.png"))
    assert "detect or segment prompt" in line and not (tmp_path / "x.png").exists() and loads == []


@pytest.mark.parametrize("answer", ["no cat here", "<loc0522><loc0522><loc0522><loc0522><loc0259><loc0561>"])
def test_draw_says_why_nothing_is_drawn(answer, tiny_pg1_dir, images, tmp_path, monkeypatch):
    _fixed_output(monkeypatch, tiny_pg1_dir, answer)  # no <loc> at all; locs but no label (a cut-off answer)
    out = tmp_path / "same.png"
    result = ok(run("generate", tiny_pg1_dir, images["a"], "detect cat", "--draw", out))
    assert "no complete box" in result.stderr and "unchanged copy" in result.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(images["a"]).convert("RGB")))


# --- chat -----------------------------------------------------------------------------------------------------------


def test_chat_encodes_each_image_once(tiny_pg1_dir, images, monkeypatch):
    dtype, n = torch.float32, 10
    want = [
        library_answer(tiny_pg1_dir, images["a"], "caption en", dtype, max_new_tokens=n)[1],
        library_answer(tiny_pg1_dir, images["a"], "answer en what colour?", dtype, max_new_tokens=n)[1],
        library_answer(tiny_pg1_dir, images["b"], "caption en", dtype, max_new_tokens=n)[1],
    ]
    assert want[0] != want[2]  # otherwise the image switch would go unseen
    counter = EncodeCounter(monkeypatch)
    script = f"caption en\n\nanswer en what colour?\n:image {images['b']}\ncaption en\n:quit\ncaption en\n"
    result = ok(run("chat", tiny_pg1_dir, images["a"], "--dtype", "float32", "--max-new-tokens", n, input=script))
    assert result.stdout == "".join(t + "\n" for t in want)  # nothing after :quit
    assert counter.calls == 2
    assert result.stderr.count("tokens/s") == 3


def test_chat_ends_at_eof_and_survives_bad_lines(tiny_pg1_dir, images):
    script = f":image {images['bad']}\n:nonsense\nbad <image> prompt\ncaption en"  # no :quit, no final newline
    result = ok(run("chat", tiny_pg1_dir, images["a"], "--max-new-tokens", 4, input=script))
    assert result.stderr.count("Error:") == 3
    assert "keeping the current image" in result.stderr
    assert result.stderr.count("tokens/s") == 1 and result.stdout.endswith("\n")


# --- profile --------------------------------------------------------------------------------------------------------


def test_profile_writes_timeline_and_plot(tiny_pg2_dir, images, tmp_path):
    out = tmp_path / "prof"
    result = ok(run("profile", tiny_pg2_dir, images["a"], "caption en", "--out", out, "--max-new-tokens", 6))
    timeline = Timeline.from_json(out / "profile.json")
    names = [m.name for m in timeline.marks]
    for phase in ("load", "encode", "prefill", "decode"):
        assert phase in names and f"{phase} done" in names
    assert names.index("load done") < names.index("prefill") < names.index("decode done")
    assert timeline.meta["model_bytes"] > 0 and timeline.peak().rss > 0
    assert (out / "profile.png").read_bytes().startswith(PNG_MAGIC)
    assert "peak RSS" in result.stdout and "profile.json" in result.stdout


# --- synth and convert ----------------------------------------------------------------------------------------------


def _params(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_model(model_dir, dtype=dtype).model.named_parameters()}


def test_synth_tiny_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "synth"
    args = ["synth", out, "--tiny", "--gemma2", "--dtype", "bfloat16", "--max-shard-size", "50KB", "--seed", 1]
    assert ok(run(*args)).stdout.strip() == str(out)
    entries = read_checkpoint(out)
    assert {e.dtype for e in entries.values()} == {torch.bfloat16}
    by_file: dict[Path, list[int]] = {}
    for e in entries.values():
        by_file.setdefault(e.path, []).append(e.nbytes)
    assert len(by_file) > 1 and all(sum(s) <= 50_000 or len(s) == 1 for s in by_file.values())
    assert load_model(out).model.cfg.is_gemma2
    # The seed reaches the writer: same numbers as the library's seed-1 checkpoint, not the seed-2 one.
    got = _params(out, torch.bfloat16)
    same = _params(tiny_checkpoint(tmp_path / "ref1", gemma2=True, seed=1), torch.bfloat16)
    other = _params(tiny_checkpoint(tmp_path / "ref2", gemma2=True, seed=2), torch.bfloat16)
    assert all(torch.equal(got[k], same[k]) for k in got)
    assert not all(torch.equal(got[k], other[k]) for k in got)


def test_synth_preset_passes_the_options(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli_files, "write_checkpoint", lambda out, cfg, **kw: calls.append((cfg, kw)) or Path(out))
    ok(run("synth", tmp_path / "big", "--preset", "paligemma2-3b-448", "--dtype", "float16", "--max-shard-size", "2GB"))
    (cfg, kw), = calls  # fmt: skip
    assert cfg is PRESETS["paligemma2-3b-448"]
    assert (kw["dtype"], kw["max_shard_bytes"], kw["seed"]) == (torch.float16, 2_000_000_000, 0)


def test_convert_rewrites_dtype_and_shards(tiny_pg1_dir, tmp_path):
    dst = tmp_path / "fp16"
    assert ok(
        run("convert", tiny_pg1_dir, dst, "--dtype", "float16", "--max-shard-size", "200KB")
    ).stdout.strip() == str(dst)
    entries = read_checkpoint(dst)
    assert {e.dtype for e in entries.values()} == {torch.float16}
    assert len({e.path for e in entries.values()}) > 1
    got, want = _params(dst, torch.float16), _params(tiny_pg1_dir, torch.float16)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert "destination exists" in assert_user_error(run("convert", tiny_pg1_dir, dst))


def test_convert_quantize_writes_a_checkpoint_loaded_as_stored(tiny_pg2_dir, images, tmp_path):
    dst = tmp_path / "int8"
    ok(run("convert", tiny_pg2_dir, dst, "--quantize", "int8"))
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["format"] == "naive-quantized"
    assert read_checkpoint(dst)["language_model.model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    record = json.loads(ok(run("info", dst, "--json")).stdout)  # no --quantize: as stored
    assert record["quantize"] == "int8"
    generated = ok(run("generate", dst, images["a"], "caption en", "--dtype", "bfloat16", "--max-new-tokens", 4))
    assert "(bfloat16, int8 on cpu)" in generated.stderr
    error = assert_user_error(run("generate", dst, images["a"], "caption en", "--quantize", "int4"))
    assert "is stored quantized to int8" in error
    assert "--quantize" in ok(run("convert", "--help")).stdout


# --- batch ----------------------------------------------------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line must parse


def _answers(records: list[dict]) -> dict[str, dict]:
    """Records by path without the timing fields, which differ from run to run and batch to batch."""
    return {r["path"]: {k: v for k, v in r.items() if k not in ("seconds", "batch")} for r in records}


@pytest.fixture()
def folder(images, tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(images["a"], d / "a.png")
    Image.open(images["b"]).convert("RGB").save(d / "b.jpg")
    shutil.copy(images["bad"], d / "broken.png")
    (d / "notes.txt").write_text("not an image, and not an image name either")
    (d / "sub.png").mkdir()  # a directory with an image name is not an image
    return d


def test_batch_writes_jsonl_skips_bad_images_and_resumes(tiny_pg1_dir, images, folder, tmp_path, monkeypatch):
    results = tmp_path / "out" / "results.jsonl"
    prompt, n = "caption en", 8
    args = ["batch", tiny_pg1_dir, folder, prompt, "--out", results, "--dtype", "float32", "--max-new-tokens", n]

    first = ok(run(*args))
    records = _records(results)
    assert [r["image"] for r in records] == ["a.png", "b.jpg", "broken.png"]
    assert records[0]["path"] == str((folder / "a.png").absolute()) and records[0]["prompt"] == prompt
    _, want_a = library_answer(tiny_pg1_dir, folder / "a.png", prompt, torch.float32, max_new_tokens=n)
    assert records[0]["output"] == want_a and records[0]["settings"]["max_new_tokens"] == n
    assert records[0]["tokens"] > 0 and records[0]["seconds"] > 0 and records[0]["batch"] == 1
    assert set(records[2]) == {"image", "path", "prompt", "settings", "error"} and "broken.png" in first.stderr

    # Resume after a run killed mid-line: the torn line goes, the new image is answered, the failed one retried.
    shutil.copy(images["b"], folder / "c.png")
    before = results.read_text()
    with results.open("a") as f:
        f.write('{"image": "torn')
    counter = EncodeCounter(monkeypatch)
    second = ok(run(*args))
    assert "2 already answered" in second.stderr and "1 failed before (retried)" in second.stderr
    assert "half-written" in second.stderr
    assert counter.calls == 1  # c.png only: the broken file never reaches the vision tower
    assert results.read_text().startswith(before)
    assert [r["image"] for r in _records(results)] == ["a.png", "b.jpg", "broken.png", "broken.png", "c.png"]

    (folder / "broken.png").unlink()
    again = ok(run(*args))
    assert counter.calls == 1 and "3 already answered" in again.stderr and "0 to do" in again.stderr
    assert "loaded" not in again.stderr  # nothing to do: the model is not even loaded


def test_batch_with_another_prompt_or_settings_does_the_work(tiny_pg1_dir, folder, tmp_path):
    results = tmp_path / "r.jsonl"
    base = ["batch", tiny_pg1_dir, folder, "--out", results, "--dtype", "float32", "--max-new-tokens", 6]
    ok(run(*base[:3], "caption en", *base[3:]))
    second = ok(run(*base[:3], "answer en what is this?", *base[3:]))
    assert "0 already answered" in second.stderr and "2 answered there only with another prompt" in second.stderr
    third = ok(run(*base[:3], "caption en", *base[3:], "--seed", 1))  # another setting: done again too
    assert "0 already answered" in third.stderr
    records = _records(results)
    assert len(records) == 9 and len({(r["path"], r["prompt"], json.dumps(r["settings"])) for r in records}) == 9


def test_batch_size_changes_nothing_but_the_speed(tiny_pg2_dir, folder, images, tmp_path):
    for i in range(3):
        shutil.copy(images["a" if i % 2 else "b"], folder / f"extra{i}.png")
    out = {}
    for size in (1, 3):
        out[size] = tmp_path / f"r{size}.jsonl"
        args = ["--out", out[size], "--batch-size", size, "--dtype", "float32", "--max-new-tokens", 10]
        ok(run("batch", tiny_pg2_dir, folder, "answer en what is in the picture?", *args))
    one, three = _records(out[1]), _records(out[3])
    assert _answers(one) == _answers(three) and len(one) == 6
    assert [r.get("batch") for r in three] == [2, 2, None, 3, 3, 3]  # the error row leaves 2 in its batch


def test_batch_killed_mid_run_resumes_without_loss_or_duplicates(tiny_pg1_dir, images, tmp_path):
    """A real process, killed with SIGKILL while it writes, then run again into the same file."""
    d = tmp_path / "many"
    d.mkdir()
    names = [f"{i:02d}.png" for i in range(24)]
    for i, name in enumerate(names):
        shutil.copy(images["a" if i % 2 else "b"], d / name)
    results = tmp_path / "r.jsonl"
    root = Path(__file__).resolve().parent.parent
    # One thread: a tiny model gains nothing from more, and on a busy machine spinning OpenMP threads cost 5x.
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
                        "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = [sys.executable, "-c", "from lowmem_paligemma.cli import main; main()", "batch", str(tiny_pg1_dir),
            str(d), "caption en", "--out", str(results), "--max-new-tokens", "16", "--batch-size", "2",
            "--dtype", "float32"]  # fmt: skip
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and results.read_text().count("\n") >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = results.read_text().count("\n")
    assert 4 <= written < len(names), "the run was not killed mid-way"
    subprocess.run(args, env=env, check=True, capture_output=True)
    records = _records(results)
    assert sorted(r["image"] for r in records) == names  # all there, none twice, every line parses


# --- errors and help ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_checkpoint(tiny_pg1_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_pg1_dir, d)
    shard = sorted(d.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated download
    return d


def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of a checkpoint broken as a download or a hand edit can break it (test_loader_malformed.py has all)."""
    shutil.copytree(src, dst)
    if how == "pickle only":
        for p in dst.glob("*.safetensors"):
            p.unlink()
        (dst / "model.safetensors.index.json").unlink()
        (dst / "pytorch_model.bin").write_bytes(b"not really a pickle")
    elif how == "missing shard":
        sorted(dst.glob("*.safetensors"))[-1].unlink()
    elif how == "broken config":
        (dst / "config.json").write_text('{"model_type": "paligemma", "text_config": ')
    return dst


@pytest.mark.parametrize(
    "case",
    [
        "missing model dir", "empty model dir", "truncated shard", "missing image", "not an image", "empty prompt",
        "image token in prompt", "unknown option", "bad dtype", "negative max-new-tokens", "top-p above 1",
        "nan temperature", "vae without draw", "batch empty prompt", "batch missing folder", "chat not an image",
        "batch workers without ray", "batch uri without ray",
        "profile without --out", "synth bad size", "synth preset and tiny", "synth gemma2 with preset",
        "synth nonempty dir", "no command option", "pickle only", "missing shard", "broken config",
        "model dir is a file",
    ],
)  # fmt: skip
def test_expected_failures_are_one_error_line(case, tiny_pg1_dir, broken_checkpoint, images, tmp_path):
    m, a = tiny_pg1_dir, images["a"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    args = {
        "missing model dir": ["generate", tmp_path / "nope", a, "caption en"],
        "empty model dir": ["generate", empty, a, "caption en"],
        "truncated shard": ["generate", broken_checkpoint, a, "caption en"],
        "missing image": ["generate", m, tmp_path / "nope.png", "caption en"],
        "not an image": ["generate", m, images["bad"], "caption en"],
        "empty prompt": ["generate", m, a, "  \t "],
        "image token in prompt": ["generate", m, a, "<image> caption en"],
        "unknown option": ["generate", m, a, "caption en", "--bogus"],
        "bad dtype": ["generate", m, a, "caption en", "--dtype", "int8"],
        "negative max-new-tokens": ["generate", m, a, "caption en", "--max-new-tokens", "-1"],
        "top-p above 1": ["generate", m, a, "caption en", "--top-p", "1.5"],
        "nan temperature": ["generate", m, a, "caption en", "--temperature", "nan"],
        "vae without draw": ["generate", m, a, "caption en", "--vae", a],
        "batch empty prompt": ["batch", m, images["a"].parent, "", "--out", tmp_path / "r.jsonl"],
        "batch missing folder": ["batch", m, tmp_path / "nope", "caption en", "--out", tmp_path / "r.jsonl"],
        "batch workers without ray": ["batch", m, a.parent, "caption en", "--out", tmp_path / "r", "--workers", 2],
        "batch uri without ray": ["batch", m, "s3://bucket/images", "caption en", "--out", tmp_path / "r.jsonl"],
        "chat not an image": ["chat", m, images["bad"]],
        "profile without --out": ["profile", m, a, "caption en"],
        "synth bad size": ["synth", tmp_path / "s", "--tiny", "--max-shard-size", "5 parsecs"],
        "synth preset and tiny": ["synth", tmp_path / "s", "--tiny", "--preset", "paligemma-3b-224"],
        "synth gemma2 with preset": ["synth", tmp_path / "s", "--preset", "paligemma-3b-224", "--gemma2"],
        "synth nonempty dir": ["synth", tmp_path / "full", "--tiny"],
        "no command option": ["generate", "--no-such-thing"],
        "model dir is a file": ["generate", a, a, "caption en"],
    }.get(case) or ["generate", _broken_copy(m, tmp_path / "copy", case), a, "caption en"]
    line = assert_user_error(run(*args))
    assert len(line) < 300


def test_errors_name_the_problem(tiny_pg1_dir, broken_checkpoint, images, tmp_path):
    assert "not a readable image" in assert_user_error(run("generate", tiny_pg1_dir, images["bad"], "caption en"))
    assert "prompt is empty" in assert_user_error(run("generate", tiny_pg1_dir, images["a"], ""))
    assert "model-" in assert_user_error(run("generate", broken_checkpoint, images["a"], "caption en"))
    assert "config.json" in assert_user_error(run("generate", tmp_path, images["a"], "caption en"))
    assert "no such directory" in assert_user_error(run("generate", tmp_path / "nope", images["a"], "caption en"))
    hub = assert_user_error(run("generate", "google/paligemma-3b-pt-224", images["a"], "caption en"))
    assert "Hub model id" in hub and "hf download google/paligemma-3b-pt-224" in hub


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused(tiny_pg1_dir, images):
    assert "CUDA" in assert_user_error(run("generate", tiny_pg1_dir, images["a"], "caption en", "--device", "cuda"))


@pytest.mark.parametrize(
    "command", [[], ["generate"], ["chat"], ["profile"], ["batch"], ["synth"], ["convert"], ["info"]]
)
def test_help(command):
    result = ok(run(*command, "--help"))
    assert result.stdout.startswith("Usage:") and len(result.stdout.splitlines()) > 5


def test_version():
    assert "lowmem-paligemma" in ok(run("--version")).stdout


# --- requests known up front: context and memory ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "profile", "chat"])
def test_a_request_over_the_context_is_one_error_before_loading(command, tiny_pg1_dir, images, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(session_module, "load_model", lambda *a, **kw: loads.append(1))
    args = {
        "generate": ["generate", tiny_pg1_dir, images["a"], "caption en"],
        "profile": ["profile", tiny_pg1_dir, images["a"], "caption en", "--out", tmp_path / "p"],
        "chat": ["chat", tiny_pg1_dir, images["a"]],
    }[command]
    line = assert_user_error(run(*args, "--max-new-tokens", 100_000, input="caption en\n"))
    assert "over the model's context of 8192" in line and "ask for at most" in line
    assert loads == []


def test_chat_refuses_one_long_line_and_goes_on(tiny_pg1_dir, images, monkeypatch):
    # The pre-flight counts the shortest prompt; a longer line that no longer fits is refused alone.
    script = "caption en " + "very " * 5000 + "\ncaption en\n"  # over 8,192 tokens, then a short line
    result = ok(run("chat", tiny_pg1_dir, images["a"], "--max-new-tokens", 8, input=script))
    assert "over the model's context" in result.stderr and result.stderr.count("Error:") == 1
    assert result.stderr.count("tokens/s") == 1


def test_a_request_that_cannot_fit_names_the_kv_cache(tiny_pg1_dir, images, monkeypatch):

    weights = sum(e.numel for e in read_checkpoint(tiny_pg1_dir).values()) * 2  # bfloat16
    spare = defaults.CHUNK_BYTES + preflight.RUNTIME_MARGIN_BYTES + 1_000_000
    monkeypatch.setattr(preflight, "available_bytes", lambda device: weights + spare)
    line = assert_user_error(run("generate", tiny_pg1_dir, images["a"], "caption en", "--max-new-tokens", 8000))
    assert "KV cache for 8,0" in line and "--force" in line
    ok(run("generate", tiny_pg1_dir, images["a"], "caption en", "--max-new-tokens", 8))


# --- interrupted work -----------------------------------------------------------------------------------------------

CLI = "from lowmem_paligemma.cli import main; main()"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_ctrl_c_exits_130_without_a_traceback(command, tiny_pg1_dir, images):
    args = [tiny_pg1_dir, images["a"], *(["caption en"] if command == "generate" else []), "--max-new-tokens", 8000]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, command, *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        # As from a terminal: a test run started in the background (`make test &`) inherits SIGINT ignored, and
        # Python keeps an ignored SIGINT ignored, so the CLI would never see the Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        if command == "chat":
            proc.stdin.write(b"caption en\n")  # stdin stays open: chat would wait for the next line
            proc.stdin.flush()
        # Loaded, then generating 8000 tokens (~40 s): interrupted a second in. Not timed by the first streamed
        # character: a tiny random model's tokens may decode to no text at all until the end (it depends on the
        # kernels the machine chose, which round bf16 differently).
        assert select.select([proc.stderr], [], [], 120)[0], "no load report within 120 s"
        first = proc.stderr.readline()
        assert first.startswith(b"loaded"), first
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        stderr = first + rest
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr and stderr.decode().rstrip().endswith("interrupted")


def test_verify_names_the_corrupted_shard(tiny_pg1_dir, images, tmp_path):
    import hashlib

    ckpt = shutil.copytree(tiny_pg1_dir, tmp_path / "ckpt")
    shards = sorted(ckpt.glob("*.safetensors"))
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in shards))
    args = ["generate", ckpt, images["a"], "caption en", "--max-new-tokens", 4]
    ok(run(*args, "--verify", sums))
    raw = bytearray(shards[0].read_bytes())
    raw[-1] ^= 1  # the last byte of the last tensor: headers stay valid
    shards[0].write_bytes(bytes(raw))
    ok(run(*args))  # without --verify the corrupted weights load
    line = assert_user_error(run(*args, f"--verify={sums}"))
    assert shards[0].name in line and "checksum" in line and "download it again" in line
    assert "no checksum to compare with" in assert_user_error(run(*args, "--verify"))  # no Hub records here
    assert "no such sums file" in assert_user_error(run(*args, "--verify", tmp_path / "nope"))
