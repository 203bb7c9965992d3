"""Shared fixtures: tiny random PaliGemma checkpoints in the Hub layout, written once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from lowmem_paligemma.formats.chooser import ENV_CACHE, ENV_KERNELS
from lowmem_paligemma.pretrained.synth import tiny_checkpoint

# Kernel measurements of the test run go to a directory of their own, never the user's ~/.cache; and the
# suite runs the reference kernels (and the reference dtype for "auto"), so results do not depend on what was
# measured fastest on this machine. tests/formats/test_chooser.py and tests/formats/test_kernel_candidates.py
# exercise every candidate and the chooser itself.
os.environ.setdefault(ENV_CACHE, tempfile.mkdtemp(prefix="lowmem-kernels-"))
os.environ.setdefault(ENV_KERNELS, "reference")


@pytest.fixture(scope="session")
def tiny_pg1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 tiny PaliGemma (Gemma 1 decoder, `config.tiny()`), ~100 KB shards + index + tokenizer."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_pg1"), gemma2=False)


@pytest.fixture(scope="session")
def tiny_pg2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 tiny PaliGemma 2 (Gemma 2 decoder, `config.tiny(gemma2=True)`), ~100 KB shards + index + tokenizer."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_pg2"), gemma2=True)
