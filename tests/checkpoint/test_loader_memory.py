"""The loader's memory bound, measured: a medium checkpoint loaded in a fresh process under the profiler.

The checkpoint's largest tensor (a 268 MB float32 embedding) is 16x the chunk bound, so a loader that
read any tensor whole, mapped the file, or allocated the model twice would fail these bounds.
"""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lowmem_paligemma.checkpoint.loader import IN_PLACE_AT_ONCE, READ_WORKERS
from lowmem_paligemma.model.config import tiny
from lowmem_paligemma.pretrained.synth import write_checkpoint

CHUNK = 16 << 20
SLACK = 48 << 20  # allocator rounding, the KV-free eval model's small extras, sampler noise

CHILD = r"""
import json, sys, torch
from lowmem_paligemma import load_model
from lowmem_paligemma.profiling.profiler import MemoryProfiler, current_rss
path, dtype, chunk = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
kernels = sys.argv[5] if len(sys.argv) > 5 else None
load_model(sys.argv[4], dtype=dtype, kernels=kernels)  # warm-up on a tiny checkpoint: every module and .so mapped
base = current_rss()
with MemoryProfiler(interval=0.002) as prof:
    model = load_model(path, dtype=dtype, chunk_bytes=chunk, kernels=kernels).model
    final = current_rss()
peak = prof.peak()
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_mkldnn)
model_bytes += sum(p.to_dense().nbytes for p in model.parameters() if p.is_mkldnn)  # reordered: same size
print(json.dumps({"base": base, "final": final, "peak_anon": peak.anon, "peak_file": peak.file,
                  "hwm": peak.hwm, "model_bytes": model_bytes}))
"""


def load_growth(path, dtype: str, warm_dir, kernels: str | None = None) -> dict:
    """The child's memory record (bytes) for loading `path` in `dtype` with CHUNK-sized chunks."""
    args = [str(path), dtype, str(CHUNK), str(warm_dir), *([kernels] if kernels else [])]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _scaled_checkpoint(tmp_path_factory, name: str, dtype: torch.dtype, vocab: int, mlp: int):
    """Tiny PaliGemma 1 with a 1024-wide, 2-layer decoder of the given vocabulary and MLP width; 200 MB shards."""
    cfg = tiny(gemma2=False)
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=vocab, hidden_size=1024, intermediate_size=mlp,
                                    num_hidden_layers=2, head_dim=256))  # fmt: skip
    path = tmp_path_factory.mktemp(name)
    write_checkpoint(path, cfg, dtype=dtype, max_shard_bytes=200_000_000, tokenizer=False)
    return path


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory):
    return _scaled_checkpoint(tmp_path_factory, "medium", torch.float32, vocab=65536, mlp=2048)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_peak_anon_is_model_plus_one_chunk(medium_dir, tiny_pg1_dir, dtype):
    checkpoint_bytes = sum(p.stat().st_size for p in medium_dir.glob("*.safetensors"))
    assert checkpoint_bytes > 300e6
    r = load_growth(medium_dir, dtype, tiny_pg1_dir)
    anon_growth = r["peak_anon"] - r["base"]["anon"]
    assert anon_growth <= r["model_bytes"] + CHUNK + SLACK, r
    # Converted chunks are read in place from the page cache, each mapped alone while it converts: the file-backed
    # RSS grows by at most that many chunks (4 MB each here), never by the shards.
    assert r["peak_file"] - r["base"]["file"] <= IN_PLACE_AT_ONCE * (CHUNK // READ_WORKERS) + (4 << 20), r
    assert r["final"]["anon"] - r["base"]["anon"] >= r["model_bytes"] * 0.9  # the model really is resident


@pytest.fixture(scope="module")
def wide_mlp_dir(tmp_path_factory):
    """Decoder weights of 33 MB each in bfloat16 (201 MB in all): reordering them into oneDNN's layout while
    the old copies stayed alive until the end of the load would add that much to the peak."""
    return _scaled_checkpoint(tmp_path_factory, "wide", torch.bfloat16, vocab=8192, mlp=16384)


def test_reordered_weights_free_their_plain_copies_during_the_load(wide_mlp_dir, tiny_pg1_dir):
    from lowmem_paligemma.formats.dense import pack_weight

    try:
        pack_weight(torch.zeros(64, 64, dtype=torch.bfloat16))
    except RuntimeError:
        pytest.skip("oneDNN cannot reorder bfloat16 weights on this CPU")
    r = load_growth(wide_mlp_dir, "bfloat16", tiny_pg1_dir, kernels="dense=packed/packed")
    assert r["peak_anon"] - r["base"]["anon"] <= r["model_bytes"] + CHUNK + SLACK, r
