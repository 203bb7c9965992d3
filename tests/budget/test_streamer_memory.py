"""The memory budget, measured: a medium checkpoint, several times what the budget leaves for weights, generated
from in a fresh process under the profiler; the page cache keeps none of it; too small a budget allocates nothing.

The budget counts the whole process (interpreter, torch, the warm-up), so the child sets it to its own RSS plus
EXTRA: room for the embedding table, the request, the pool's two layer buffers and about one resident layer,
while the checkpoint's 16 decoder layers take 490 MB.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lowmem_paligemma.checkpoint.pagecache import drop_file, resident_bytes
from lowmem_paligemma.model.config import tiny
from lowmem_paligemma.pretrained.synth import write_checkpoint

EXTRA = 200_000_000
TOO_LITTLE = 20_000_000

CHILD = r"""
import json, sys, torch
from lowmem_paligemma import InsufficientMemoryError, load_model
from lowmem_paligemma.budget.memory import request_bytes
from lowmem_paligemma.model.config import load_config
from lowmem_paligemma.model.generate import generate
from lowmem_paligemma.checkpoint.pagecache import resident_total
from lowmem_paligemma.profiling.profiler import MemoryProfiler, current_rss, reset_peak
from pathlib import Path
path, warm_dir, extra, too_little = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
quantize = sys.argv[5] or None
shards = sorted(Path(path).glob("*.safetensors"))

def tokens(model):
    cfg = model.cfg
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 100, 200, 108]])
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    return list(generate(model, ids, torch.zeros_like(ids), pixel_values=pixels * 2 - 1, max_new_tokens=4,
                         eos_token_ids=[]))

warm = load_model(warm_dir, dtype=torch.bfloat16, quantize=quantize).model  # every module and .so mapped already
tokens(warm)
del warm
before = current_rss()
try:
    load_model(path, dtype=torch.bfloat16, quantize=quantize, max_memory=before["rss"] + too_little)
    refused = None
except InsufficientMemoryError as e:
    refused = str(e)
after_refusal = current_rss()
reset_peak()
base = current_rss()
budget = base["rss"] + extra
cfg = load_config(path)
request = request_bytes(cfg, cfg.num_image_tokens + 4, 4, torch.bfloat16)
with MemoryProfiler(interval=0.002) as prof:
    loaded = load_model(path, dtype=torch.bfloat16, quantize=quantize, max_memory=budget, request=request)
    streamed = tokens(loaded.model)
    cached = resident_total(shards)
peak, final = prof.peak(), current_rss()
plan, stats = loaded.residency, loaded.streamer.stats
loaded.streamer.close()
del loaded
resident = tokens(load_model(path, dtype=torch.bfloat16, quantize=quantize).model)
print(json.dumps({"refused": refused, "refusal_growth": after_refusal["rss"] - before["rss"], "base": base,
                  "budget": budget, "peak_rss": max(peak.rss, peak.hwm or 0), "peak_anon": peak.anon,
                  "peak_file": peak.file, "planned": plan.total, "streamed": len(plan.streamed),
                  "decoder": sum(u.group == "decoder" for u in plan.units), "cached": cached,
                  "bytes_read": stats.bytes_read, "per_token": plan.read_per_pass("decoder"),
                  "per_image": plan.read_per_pass("vision"), "passes": stats.passes,
                  "same_tokens": streamed == resident}))
"""


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory):
    cfg = tiny(gemma2=False)
    text = replace(cfg.text, vocab_size=16384, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                   num_attention_heads=4, head_dim=256)  # fmt: skip
    path = tmp_path_factory.mktemp("medium_stream")
    write_checkpoint(path, replace(cfg, text=text), dtype=torch.bfloat16, max_shard_bytes=200_000_000, tokenizer=False)
    for shard in path.glob("*.safetensors"):
        with open(shard, "rb+") as f:
            os.fsync(f.fileno())  # clean pages, so the cache can be emptied: the run starts cold
        drop_file(shard)
    return path


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_peak_rss_stays_in_the_budget_and_the_cache_stays_empty(medium_dir, tiny_pg1_dir, quantize):
    checkpoint_bytes = sum(p.stat().st_size for p in medium_dir.glob("*.safetensors"))
    assert checkpoint_bytes > 2.5 * EXTRA
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(medium_dir), str(tiny_pg1_dir), str(EXTRA), str(TOO_LITTLE), quantize or ""],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # Too small a budget: one error naming the minimum, before anything large was allocated.
    assert r["refused"] and "below the minimum" in r["refused"] and r["refusal_growth"] < 16 << 20, r
    assert r["streamed"] >= r["decoder"] - 2 and r["planned"] <= r["budget"], r
    assert r["peak_rss"] <= r["budget"], r  # the kernel's own high-water mark, reset just before
    assert r["peak_file"] - r["base"]["file"] <= 32 << 20, r  # nothing mapped: weights are anonymous memory
    assert r["cached"] <= 1 << 20, r  # read past the page cache (O_DIRECT), and the load's pages dropped
    assert r["passes"] == {"vision": 1, "decoder": 4}, r  # one pass per forward: the prefill, then 3 tokens
    assert r["bytes_read"] >= r["per_image"] + 4 * r["per_token"] > 3 * checkpoint_bytes, r
    assert r["same_tokens"], r


SAMPLED_LOADS = r"""
import sys, threading, torch
from pathlib import Path
from lowmem_paligemma import load_model
from lowmem_paligemma.checkpoint.pagecache import drop_file, resident_total
from lowmem_paligemma.profiling.profiler import current_rss
path, extra = Path(sys.argv[1]), int(sys.argv[2])
shards = sorted(path.glob("*.safetensors"))
worst = start = 0
for _ in range(4):  # the leftover folios depend on how reads interleave: several loads catch it
    for shard in shards:
        drop_file(shard)
    start = max(start, resident_total(shards))
    seen, stop = [], threading.Event()
    def sample():
        while not stop.is_set():
            seen.append(resident_total(shards) or 0)
            stop.wait(0.01)
    sampler = threading.Thread(target=sample)
    budget = current_rss()["rss"] + extra
    sampler.start()
    model = load_model(path, dtype=torch.bfloat16, max_memory=budget).model
    stop.set()
    sampler.join()
    del model
    worst = max(worst, *seen)
print(start, worst)
"""


@pytest.fixture(scope="module")
def int8_medium_dir(tmp_path_factory):
    """16 int8 decoder layers and a 134 MB bf16 embedding (quantized at load), in one 588 MB shard."""
    from lowmem_paligemma.pretrained.convert import convert_checkpoint

    cfg = tiny(gemma2=True)
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=65536, hidden_size=1024, intermediate_size=8192,
                                    num_hidden_layers=16, head_dim=256))  # fmt: skip
    src, dst = tmp_path_factory.mktemp("int8-src"), tmp_path_factory.mktemp("int8") / "model"
    write_checkpoint(src, cfg, dtype=torch.bfloat16, max_shard_bytes=200_000_000, tokenizer=False)
    convert_checkpoint(src, dst, torch.bfloat16, quantize="int8")
    for f in src.iterdir():
        f.unlink()
    for f in dst.iterdir():  # written pages are dropped only once on disk: make them clean now
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return dst


def test_a_budgeted_load_keeps_no_more_than_its_reads_in_flight_in_the_page_cache(int8_medium_dir):
    from lowmem_paligemma.defaults import CHUNK_BYTES as DEFAULT_CHUNK_BYTES

    shard = next(int8_medium_dir.glob("*.safetensors"))
    if resident_bytes(shard) is None:
        pytest.skip("no mincore here")
    out = subprocess.run([sys.executable, "-c", SAMPLED_LOADS, str(int8_medium_dir), str(350_000_000)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    start, worst = map(int, out.stdout.strip().splitlines()[-1].split())
    assert start == 0, f"{start / 1e6:.0f} MB cached before the load: the drop did not take"
    # In flight at once: the loader's chunk budget (split over its readers), and a widened drop's edges.
    assert worst <= DEFAULT_CHUNK_BYTES + 16_000_000, f"{worst / 1e6:.0f} MB of the checkpoint stayed cached"
