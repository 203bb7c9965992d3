"""Streamed layers give the tokens of the resident model: every residency, dtype path and read path, misses,
failed forwards and failed reads; the page cache stays clean; the reader stops with its model."""

import gc
import os
import shutil
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from lowmem_paligemma import CheckpointError, load_model
from lowmem_paligemma.budget.residency import plan_residency
from lowmem_paligemma.checkpoint.loader import checkpoint_plan
from lowmem_paligemma.checkpoint.pagecache import drop_file, resident_total
from lowmem_paligemma.model.generate import generate
from lowmem_paligemma.pretrained.build import build_model
from lowmem_paligemma.pretrained.keys import TIED, normalize_key
from lowmem_paligemma.pretrained.synth import tiny_checkpoint

DTYPE = torch.bfloat16
NEW_TOKENS = 6


def _settle(model_dir):
    """Written pages flushed and evicted: the page cache starts without the checkpoint."""
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        drop_file(path)
    return model_dir


@pytest.fixture(scope="module")
def stored_as_computed(tmp_path_factory):
    """Tiny PG1 and PG2 stored in bfloat16 (read straight into the buffers), and pre-quantized int8 copies."""
    out = {}
    for gemma2 in (False, True):
        name = "pg2" if gemma2 else "pg1"
        bf16 = tiny_checkpoint(tmp_path_factory.mktemp(f"{name}_bf16"), gemma2, dtype=DTYPE)
        out[name, None] = _settle(bf16)
        int8 = tmp_path_factory.mktemp(f"{name}_int8")  # what an int8 checkpoint holds: weight int8, weight_scale
        shutil.copy(bf16 / "config.json", int8 / "config.json")
        state = load_model(bf16, dtype=DTYPE, quantize="int8").model.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, int8 / "model.safetensors")
        out[name, "int8"] = _settle(int8)
    return out


def _prompt(model, seed=0):
    cfg = model.cfg
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 100, 200, 108]])
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    return ids, torch.zeros_like(ids), pixels


def _tokens(model, seed=0):
    ids, types, pixels = _prompt(model, seed)
    return list(generate(model, ids, types, pixel_values=pixels, max_new_tokens=NEW_TOKENS, eos_token_ids=[]))


def _plan(model_dir, quantize, kept: int | str, buffers=2):
    """The plan for a budget that keeps `kept` decoder layers ("all": everything) with this process counted as
    0 bytes, so that the budget is exact to the byte."""
    model = build_model(model_dir, quantize)[0]
    load_plan = checkpoint_plan(model, model_dir, normalize_key, TIED)
    base = plan_residency(model, 1 << 40, DTYPE, 0, load_plan=load_plan, process_bytes=0)
    fixed = sum(base.parts.values())
    decoder = [u for u in base.units if u.group == "decoder"]
    if kept == "all":
        budget = fixed + sum(u.nbytes for u in base.units)
    else:
        streamed = [u for u in base.units if u.group == "vision"] + decoder[kept:]
        budget = fixed + sum(u.nbytes for u in decoder[:kept]) + buffers * max(u.buffer_bytes for u in streamed)
    return plan_residency(model, budget, DTYPE, 0, load_plan=load_plan, process_bytes=0)


def _stream_everything(model_dir, quantize, dtype):
    """A plan that streams every layer whatever it costs (tiny layers cost less resident than streamed)."""
    model = build_model(model_dir, quantize)[0]
    load_plan = checkpoint_plan(model, model_dir, normalize_key, TIED)
    base = plan_residency(model, 1 << 40, dtype, 0, load_plan=load_plan, process_bytes=0)
    return replace(base, streamed=tuple(u.name for u in base.units), buffers=2,
                   buffer_bytes=max(u.buffer_bytes for u in base.units))  # fmt: skip


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("which", ["pg1", "pg2"])
@pytest.mark.parametrize("kept", [0, 1, "all"])
def test_budgets_keep_none_some_all_layers_and_the_tokens(stored_as_computed, which, quantize, kept):
    model_dir = stored_as_computed[which, quantize]
    want = _tokens(load_model(model_dir, dtype=DTYPE, quantize=quantize).model)
    plan = _plan(model_dir, quantize, kept)
    decoder = [u for u in plan.units if u.group == "decoder"]
    resident = [u for u in plan.resident_units if u.group == "decoder"]
    assert len(resident) == (len(decoder) if kept == "all" else kept)
    assert not any(u.converts for u in plan.units)  # read as stored, int8 bytes and scales included
    loaded = load_model(model_dir, dtype=DTYPE, quantize=quantize, residency=plan)
    model = loaded.model
    assert _tokens(model) == want
    if kept == "all":
        assert loaded.streamer is None
        return
    stats = loaded.streamer.stats
    # The one miss: the first decoder layer, read at start to measure the disk, before the vision tower ran.
    vision_streamed = any(u.group == "vision" and u.name in plan.streamed for u in plan.units)
    assert loaded.streamer.direct and stats.misses == int(vision_streamed)
    assert stats.passes == {"vision": 1, "decoder": NEW_TOKENS}  # one pass per forward: prefill, then per token
    streamed = [u for u in plan.units if u.name in plan.streamed]
    per_image = sum(u.stored_bytes for u in streamed if u.group == "vision")
    assert stats.bytes_read >= per_image + NEW_TOKENS * plan.read_per_pass("decoder")
    # Between forwards a streamed layer holds no memory, but those read ahead into the buffers.
    held = [n for n in plan.streamed if not any(p.is_meta for p in model.get_submodule(n).parameters())]
    assert len(held) <= plan.buffers
    loaded.streamer.close()


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("which", ["pg1", "pg2"])
def test_converted_and_quantized_as_read(tiny_pg1_dir, tiny_pg2_dir, which, quantize):
    """The float32 fixtures, computed in bfloat16 or int8: every streamed layer goes through the staging
    buffer and the loader's conversion or quantizer each pass. Tiny layers cost less resident than staged, so
    the plan is forced to stream them all."""
    model_dir = tiny_pg2_dir if which == "pg2" else tiny_pg1_dir
    want = _tokens(load_model(model_dir, dtype=DTYPE, quantize=quantize).model)
    plan = _stream_everything(model_dir, quantize, DTYPE)
    assert all(u.converts for u in plan.units)
    loaded = load_model(model_dir, dtype=DTYPE, quantize=quantize, residency=plan)
    model = loaded.model
    assert _tokens(model) == want
    assert loaded.streamer.stats.bytes_read >= NEW_TOKENS * 2 * plan.read_per_pass("decoder") // 2
    loaded.streamer.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_dtype(tiny_pg2_dir, dtype):
    """float32 from the float32 fixture is read straight into place; float16 is converted as read."""
    ids, types, pixels = _prompt(load_model(tiny_pg2_dir, dtype=dtype).model)
    run = lambda m: list(generate(m, ids, types, pixel_values=pixels, max_new_tokens=NEW_TOKENS, eos_token_ids=[]))
    want = run(load_model(tiny_pg2_dir, dtype=dtype).model)
    plan = _stream_everything(tiny_pg2_dir, None, dtype)
    assert all(u.converts == (dtype != torch.float32) for u in plan.units)
    loaded = load_model(tiny_pg2_dir, dtype=dtype, residency=plan)
    model = loaded.model
    assert run(model) == want
    loaded.streamer.close()


def test_int4_quantized_as_read(tmp_path):
    from lowmem_paligemma.formats.int4 import Int4Linear
    from lowmem_paligemma.model.config import tiny
    from lowmem_paligemma.pretrained.synth import write_checkpoint

    cfg = tiny(gemma2=True, hidden_size=128, intermediate_size=256, head_dim=32)  # wide enough for int4 groups
    model_dir = write_checkpoint(tmp_path / "int4", cfg, max_shard_bytes=200_000)
    want = _tokens(load_model(model_dir, dtype=DTYPE, quantize="int4").model)
    loaded = load_model(model_dir, dtype=DTYPE, quantize="int4", residency=_stream_everything(model_dir, "int4", DTYPE))
    model = loaded.model
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj, Int4Linear)
    assert _tokens(model) == want
    loaded.streamer.close()


@pytest.mark.parametrize("prefetch, direct, buffers", [(False, None, 2), (True, False, 2), (False, False, 2),
                                                      (True, None, 1)])  # fmt: skip
def test_without_prefetch_without_direct_reads_and_one_buffer(stored_as_computed, prefetch, direct, buffers):
    model_dir = stored_as_computed["pg2", None]
    want = _tokens(load_model(model_dir, dtype=DTYPE).model)
    plan = _plan(model_dir, None, 1, buffers=buffers)
    assert plan.buffers == buffers  # a budget that holds one buffer gets one: read after use, not ahead
    # direct False: the fallback for filesystems without O_DIRECT, buffered reads whose pages are dropped
    loaded = load_model(model_dir, dtype=DTYPE, residency=plan, prefetch=prefetch, direct_io=direct)
    model = loaded.model
    assert loaded.streamer.direct == (direct is None)
    assert _tokens(model) == want
    reads = loaded.streamer.stats.layers_read
    streamed_decoder = [u for u in plan.units if u.name in plan.streamed and u.group == "decoder"]
    if not prefetch:  # what the forwards asked for, and the first decoder layer read at start (the disk probe)
        assert reads == 1 + len(plan.streamed) - len(streamed_decoder) + NEW_TOKENS * len(streamed_decoder)
    loaded.streamer.close()


@pytest.mark.parametrize("direct", [None, False])
def test_the_page_cache_keeps_nothing_of_the_checkpoint(stored_as_computed, direct):
    model_dir = stored_as_computed["pg1", None]
    shards = list(model_dir.glob("*.safetensors"))
    plan = _plan(model_dir, None, 1)
    loaded = load_model(model_dir, dtype=DTYPE, residency=plan, direct_io=direct)
    model = loaded.model
    _tokens(model)
    loaded.streamer.close()  # joins the reader: a read-ahead still in flight would hold its pages until dropped
    assert resident_total(shards) == 0
    load_model(model_dir, dtype=DTYPE)  # a plain load leaves the file cached: the measurement can see it
    assert resident_total(shards) > 0
    for path in shards:
        drop_file(path)


def test_an_image_between_tokens_is_a_miss_and_still_right(stored_as_computed):
    model_dir = stored_as_computed["pg2", None]
    resident = load_model(model_dir, dtype=DTYPE).model
    want = [_tokens(resident, seed) for seed in (0, 1, 2)]
    loaded = load_model(model_dir, dtype=DTYPE, residency=_plan(model_dir, None, 2))
    model = loaded.model
    assert [_tokens(model, seed) for seed in (0, 1, 2)] == want
    assert loaded.streamer.stats.misses >= 2  # the vision tower came while the next token's layers were read ahead
    loaded.streamer.close()


def test_a_forward_that_raises_frees_its_buffer(stored_as_computed):
    model_dir = stored_as_computed["pg1", None]
    want = _tokens(load_model(model_dir, dtype=DTYPE).model)
    loaded = load_model(model_dir, dtype=DTYPE, residency=_plan(model_dir, None, 0))
    model = loaded.model
    ids, types, pixels = _prompt(model)
    from lowmem_paligemma.model.gemma import KVCache

    with torch.inference_mode(), pytest.raises(ValueError, match="KV cache holds"):
        model(ids, pixels, types, cache=KVCache(model.cfg.text, 1, 4, DTYPE, "cpu"))  # too short: layer 0 raises
    assert _tokens(model) == want
    loaded.streamer.close()


def test_a_read_that_fails_is_a_checkpoint_error(stored_as_computed, tmp_path):
    model_dir = shutil.copytree(stored_as_computed["pg1", None], tmp_path / "copy")
    loaded = load_model(model_dir, dtype=DTYPE, residency=_plan(model_dir, None, 0), prefetch=False)
    model = loaded.model
    _tokens(model)
    for shard in model_dir.glob("*.safetensors"):
        os.truncate(shard, 1000)  # the checkpoint changed under the running model
    with pytest.raises(CheckpointError, match="reading streamed layer .* failed"):
        _tokens(model)
    loaded.streamer.close()


def test_progress_shows_layers_and_bytes(stored_as_computed, capsys):
    model_dir = stored_as_computed["pg1", None]
    loaded = load_model(model_dir, dtype=DTYPE, residency=_plan(model_dir, None, 0), progress=True)
    model = loaded.model
    _tokens(model)
    err = capsys.readouterr().err
    assert "decoder pass" in err and "vision pass" in err and "GB read" in err and "layer/s" in err
    loaded.streamer.close()


def test_the_reader_stops_with_its_model(stored_as_computed):
    model_dir = stored_as_computed["pg1", None]
    loaded = load_model(model_dir, dtype=DTYPE, residency=_plan(model_dir, None, 0))
    model = loaded.model
    thread = loaded.streamer._thread
    assert loaded.streamer.read_rate(timeout=10) > 0
    del model, loaded
    gc.collect()
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not thread.is_alive()
