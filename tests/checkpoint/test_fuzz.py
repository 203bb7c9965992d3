"""Seeded fuzzing (tests/fuzzing.py): every mutated checkpoint is refused with the project's own error or loads the
same model; every mutated image decodes or is an ImageError. `make fuzz` runs the same engine on thousands of cases.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from fuzzing import CheckpointFuzzer, image_case, image_seeds, tiny_processor

CHECKPOINT_CASES = 150  # per model: a few seconds each on two cores
IMAGE_CASES = 600


def _verdicts(outcomes) -> Counter:
    wrong = [f"{o.target}: {o.mutation}: {o.detail}" for o in outcomes if o.verdict == "wrong"]
    assert wrong == []
    return Counter((o.target, o.verdict) for o in outcomes)


@pytest.mark.parametrize("gemma2", [False, True], ids=["pg1", "pg2"])
def test_mutated_checkpoints_are_refused_or_load_the_same_model(gemma2, tmp_path: Path) -> None:
    fuzzer = CheckpointFuzzer(tmp_path, gemma2)
    offset = 10**6 if gemma2 else 0  # the seeds `make fuzz` uses for this model
    counts = _verdicts([fuzzer.case(offset + seed) for seed in range(CHECKPOINT_CASES)])
    # Every target was reached and most mutations are refused: a fuzzer whose edits never land proves nothing.
    for target in ("header", "index", "config"):
        assert counts[(target, "refused")] > 10, counts
    assert sum(n for (_, verdict), n in counts.items() if verdict == "refused") > CHECKPOINT_CASES * 0.7


def test_mutated_images_decode_or_are_image_errors(tiny_pg1_dir: Path, tmp_path: Path) -> None:
    processor, seeds = tiny_processor(tiny_pg1_dir), image_seeds()
    counts = _verdicts([image_case(processor, seeds, tmp_path / "image", seed) for seed in range(IMAGE_CASES)])
    assert counts[("image", "refused")] > IMAGE_CASES / 4 and counts[("image", "identical")] > IMAGE_CASES / 4


def test_the_fuzzer_finds_what_it_looks_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A loader that reads a wrong header length a byte off (the bug the fuzzer first found) must be caught.
    from lowmem_paligemma.checkpoint import safetensors_io

    fuzzer = CheckpointFuzzer(tmp_path, gemma2=False)
    monkeypatch.setattr(safetensors_io, "_check_tiling", lambda path, spans, data_size: None)
    outcomes = [fuzzer.case(seed) for seed in range(100)]
    assert any(o.verdict == "wrong" and "declared header length -" in o.mutation for o in outcomes)
