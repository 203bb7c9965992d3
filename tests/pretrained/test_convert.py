"""convert_checkpoint: same weights as a cast at load time, faithful keys and files, sharding, refusals, RAM bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from convert_child import convert_growth
from safetensors.torch import load_file, save_file

from lowmem_paligemma import CheckpointError, load_model
from lowmem_paligemma.checkpoint.safetensors_io import read_checkpoint
from lowmem_paligemma.model.config import tiny
from lowmem_paligemma.pretrained.convert import convert_checkpoint
from lowmem_paligemma.pretrained.synth import write_checkpoint, write_key_variant

MB = 10**6


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_converted_loads_like_a_cast_of_the_source(tiny_pg2_dir, tmp_path, dtype):
    dst = convert_checkpoint(tiny_pg2_dir, tmp_path / "out", dtype=dtype)
    want = _params(load_model(tiny_pg2_dir, dtype=dtype).model)
    got = _params(load_model(dst, dtype=dtype).model)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and got[k].dtype == dtype for k in want)


def test_headers_keys_and_side_files(tiny_pg1_dir, tmp_path):
    dst = convert_checkpoint(tiny_pg1_dir, tmp_path / "out", dtype=torch.bfloat16)
    src_entries, dst_entries = read_checkpoint(tiny_pg1_dir), read_checkpoint(dst)
    assert dst_entries.keys() == src_entries.keys()
    assert all(e.dtype == torch.bfloat16 and e.shape == src_entries[k].shape for k, e in dst_entries.items())
    raw = (dst / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    (tmp_path / "plain").mkdir()
    assert dst.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not a temp directory's 0700
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (tiny_pg1_dir / name).read_bytes()


def test_original_key_names_are_kept(tiny_pg1_dir, tmp_path):
    # transformers 5.x save layout (no `vision_model.`) plus a stored lm_head: copied under the same names.
    src = write_key_variant(tiny_pg1_dir, tmp_path / "tf5", "tf5_save", lm_head=True)
    dst = convert_checkpoint(src, tmp_path / "out", dtype=torch.float16)
    assert read_checkpoint(dst).keys() == read_checkpoint(src).keys()
    assert "language_model.lm_head.weight" in read_checkpoint(dst)
    want = _params(load_model(src, dtype=torch.float16).model)
    got = _params(load_model(dst, dtype=torch.float16).model)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_small_chunks_write_identical_bytes(tiny_pg2_dir, tmp_path):
    default = convert_checkpoint(tiny_pg2_dir, tmp_path / "default", dtype=torch.bfloat16)
    small = convert_checkpoint(tiny_pg2_dir, tmp_path / "small", dtype=torch.bfloat16, chunk_bytes=300)
    assert _files(small) == _files(default)


def test_small_max_shard_bytes_gives_several_shards_and_an_index(tiny_pg2_dir, tmp_path):
    dst = convert_checkpoint(tiny_pg2_dir, tmp_path / "out", dtype=torch.bfloat16, max_shard_bytes=40_000)
    shards = sorted(dst.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_checkpoint(tiny_pg2_dir))
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in read_checkpoint(dst).values())
    entries = list(read_checkpoint(dst).values())
    for shard in shards:  # a shard over the limit holds a single tensor that is itself over it
        in_shard = [e for e in entries if e.path.name == shard.name]
        assert sum(e.nbytes for e in in_shard) <= 40_000 or len(in_shard) == 1
    one = convert_checkpoint(tiny_pg2_dir, tmp_path / "one", dtype=torch.bfloat16)
    assert [f.name for f in one.glob("*.safetensors")] == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    sharded, single = _params(load_model(dst).model), _params(load_model(one).model)
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_non_float_tensors_are_copied_as_is(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    tensors = {
        "w": torch.randn(5, 3),
        "ids": torch.arange(-7, 7, dtype=torch.int64).reshape(2, 7),
        "odd_bytes": torch.arange(5, dtype=torch.uint8),  # 5 bytes: must not leave a wider tensor unaligned
        "flag": torch.tensor(True),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    save_file(tensors, src / "model.safetensors")
    dst = convert_checkpoint(src, tmp_path / "dst", dtype=torch.float16)
    got = load_file(dst / "model.safetensors")  # the mmap reader: also checks the file is well formed
    assert got.keys() == tensors.keys()
    for k in ("ids", "odd_bytes", "flag"):
        assert got[k].dtype == tensors[k].dtype and torch.equal(got[k], tensors[k])
    assert got["w"].dtype == got["scalar"].dtype == torch.float16
    assert torch.equal(got["w"], tensors["w"].half()) and got["scalar"].item() == 2.5


def test_refuses_a_non_empty_destination_and_the_source_itself(tiny_pg1_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(tiny_pg1_dir, busy)
    assert [f.name for f in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="is the source"):
        convert_checkpoint(tiny_pg1_dir, tiny_pg1_dir)
    with pytest.raises(ValueError, match="dtype"):
        convert_checkpoint(tiny_pg1_dir, tmp_path / "int", dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        convert_checkpoint(tiny_pg1_dir, tmp_path / "int", dtype="int8")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_checkpoint(tiny_pg1_dir, empty) == empty  # an existing empty directory is filled
    assert (empty / "model.safetensors").is_file()
    named = convert_checkpoint(tiny_pg1_dir, tmp_path / "named", dtype="float16")  # a name, as load_model takes
    assert {e.dtype for e in read_checkpoint(named).values() if e.dtype.is_floating_point} == {torch.float16}


def test_corrupt_source_leaves_nothing(tiny_pg1_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_pg1_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    last = sorted(src.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-10])  # truncated download
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(src, tmp_path / "dst")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["src"]


def test_failure_while_writing_leaves_nothing(tiny_pg1_dir, tmp_path):
    def interrupt(done: int, total: int) -> None:
        if done > total // 2:  # several shards' worth written by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_pg1_dir, tmp_path / "dst", max_shard_bytes=20_000, progress=interrupt)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor the hidden temporary directory


def test_memory_stays_bounded_by_chunk_not_by_tensor(tmp_path):
    # 256 MB fp32 embedding (262144 x 256) and ~290 MB in all: reading any tensor whole would show.
    cfg = tiny()
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=262_144, hidden_size=256, intermediate_size=2048))
    src = write_checkpoint(tmp_path / "src", cfg, dtype=torch.float32, max_shard_bytes=150 * MB, tokenizer=False)
    largest = max(e.nbytes for e in read_checkpoint(src).values())
    assert largest >= 256 * MB
    chunk = 8 << 20
    growth = convert_growth(src, tmp_path / "dst", chunk)
    bound = 3 * chunk + 64 * MB  # source chunk + converted chunk + allocator slack
    assert growth["anon"] < bound, growth
    assert growth["rss"] < bound, growth  # no mmap: file-backed pages would show here
    if growth["hwm"] is not None:  # the kernel's peak catches what 10 ms sampling misses
        assert growth["hwm"] < bound, growth
    assert bound < largest / 2
    assert read_checkpoint(tmp_path / "dst").keys() == read_checkpoint(src).keys()


_KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from lowmem_paligemma.pretrained.convert import convert_checkpoint

    def progress(done, total):
        if done < total:  # a shard file is open and half written: stop here until killed
            print("writing", flush=True)
            time.sleep(600)

    convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_bytes=50_000, progress=progress)
    """
)


def test_convert_killed_mid_write_leaves_nothing_loadable(tiny_pg1_dir, tmp_path):
    dst = tmp_path / "dst"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(tiny_pg1_dir), str(dst)], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"writing\n"
        child.kill()  # SIGKILL: no cleanup runs
        child.wait(timeout=60)
    finally:
        child.kill()
    assert not dst.exists()  # nothing that looks like a finished checkpoint
    (partial,) = tmp_path.glob(".dst.*.partial")
    assert any(partial.glob("*.safetensors"))  # the killed run really was writing
    for f in tiny_pg1_dir.iterdir():  # even with every file in place (killed just before the rename)
        if not (partial / f.name).exists():
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="unfinished output of a `convert`"):
        load_model(partial)
    with pytest.raises(CheckpointError, match="unfinished output of a `convert`"):
        read_checkpoint(partial)
    # The next convert succeeds and removes what the killed one left.
    convert_checkpoint(tiny_pg1_dir, dst, dtype=torch.float32, max_shard_bytes=50_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    want, got = (
        _params(load_model(tiny_pg1_dir, dtype=torch.float32).model),
        _params(load_model(dst, dtype=torch.float32).model),
    )
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_running_converts_directory_is_left_alone(tiny_pg1_dir, tmp_path):
    running = tmp_path / f".dst.{os.getpid()}.0123abcd.partial"  # this process: alive
    gone = tmp_path / ".dst.999999999.0123abcd.partial"  # no such process
    running.mkdir()
    gone.mkdir()
    convert_checkpoint(tiny_pg1_dir, tmp_path / "dst")
    assert running.is_dir() and not gone.exists()
