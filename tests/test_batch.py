"""The batch results file: what counts as recorded, and resuming after a run killed mid-line."""

import json

from lowmem_paligemma.batch import IMAGE_SUFFIXES, list_images, open_results, recorded_images


def test_recorded_images_skip_torn_and_foreign_lines(tmp_path):
    results = tmp_path / "r.jsonl"
    assert recorded_images(results) == set()
    results.write_text('{"image": "a.png", "output": "x"}\n{"image": "b.png", "error": "bad"}\n[1, 2]\n{"image": "c.p')
    assert recorded_images(results) == {"a.png", "b.png"}


def test_open_results_starts_a_fresh_line_after_a_torn_one(tmp_path):
    results = tmp_path / "sub" / "r.jsonl"
    with open_results(results) as f:
        f.write(json.dumps({"image": "a.png"}) + "\n")
    with results.open("a") as f:
        f.write('{"image": "b.p')  # killed mid-line
    with open_results(results) as f:
        f.write(json.dumps({"image": "c.png"}) + "\n")
    lines = results.read_text().splitlines()
    assert lines[0] == '{"image": "a.png"}' and lines[-1] == '{"image": "c.png"}' and len(lines) == 3


def test_list_images_by_suffix_only_files(tmp_path):
    for name in ("b.JPG", "a.png", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]
    assert ".gif" in IMAGE_SUFFIXES
