"""The safetensors module: what the writer writes the reader (and safetensors itself) reads back, shard
planning and naming, chunked reads, short reads. Malformed files are in test_loader_malformed.py."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file

from lowmem_paligemma.checkpoint import safetensors_io as st
from lowmem_paligemma.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.scalar": torch.tensor(2.5, dtype=torch.float16),
        "d.ids": torch.arange(-4, 5, dtype=torch.int64),
        "e.flags": torch.tensor([True, False, True]),
        "f.bytes": torch.arange(5, dtype=torch.uint8),
    }


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64])
def test_writer_reader_round_trip(tmp_path, max_shard_bytes):
    tensors = _tensors()
    specs = [st.TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    seen = []
    weight_map = st.write_sharded(tmp_path, specs, lambda s: iter([tensors[s.name]]), max_shard_bytes,
                                  lambda done, total: seen.append((done, total)))  # fmt: skip
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == sorted(set(weight_map.values()))
    assert seen[-1][0] == seen[-1][1] == sum(s.nbytes for s in specs)
    if len(files) == 1:
        assert files == ["model.safetensors"] and not (tmp_path / st.INDEX_NAME).exists()
    else:
        assert files == st.shard_names(len(files)) and len(files) > 2
        index = json.loads((tmp_path / st.INDEX_NAME).read_text())
        assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    entries = st.read_checkpoint(tmp_path)
    assert set(entries) == set(tensors)
    first = {e.path: min(x.offset for x in entries.values() if x.path == e.path) for e in entries.values()}
    assert all(offset % 8 == 0 for offset in first.values())  # the header is padded: data starts aligned
    for key, want in tensors.items():
        e = entries[key]
        assert (e.dtype, e.shape, e.nbytes) == (want.dtype, tuple(want.shape), want.nbytes)
        assert torch.equal(load_file(e.path)[key], want)  # safetensors itself reads what we wrote
        chunks = [c.clone().reshape(-1) for c in st.read_rows(e, chunk_bytes=8)]  # views of one reused buffer
        got = torch.cat(chunks).reshape(want.shape)
        assert torch.equal(got, want)


def test_rows_come_in_bounded_chunks(tmp_path):
    t = torch.arange(40, dtype=torch.float32).reshape(10, 4)  # 16-byte rows
    st.write_sharded(tmp_path, [st.TensorSpec("t", t.dtype, (10, 4))], lambda s: iter([t]))
    entry = st.read_checkpoint(tmp_path)["t"]
    sizes = [c.shape[0] for c in st.read_rows(entry, chunk_bytes=48)]
    assert sizes == [3, 3, 3, 1]
    assert [c.shape[0] for c in st.read_rows(entry, chunk_bytes=1)] == [1] * 10  # at least one row


def test_short_reads_are_retried(tmp_path, monkeypatch):
    t = torch.randn(100)
    st.write_sharded(tmp_path, [st.TensorSpec("t", t.dtype, (100,))], lambda s: iter([t]))
    entry = st.read_checkpoint(tmp_path)["t"]
    real = os.preadv
    calls = []

    def short(fd, buffers, offset):  # at most 7 bytes a call, as a signal-interrupted read can return
        calls.append(1)
        return real(fd, [buffers[0][:7]], offset)

    monkeypatch.setattr(st.os, "preadv", short)
    out = torch.empty(100)
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        st.pread_into(fd, out, entry.offset, entry.path)
    finally:
        os.close(fd)
    assert torch.equal(out, t) and len(calls) == -(-400 // 7)


def test_reading_past_the_end_names_the_file(tmp_path):
    t = torch.randn(10)
    st.write_sharded(tmp_path, [st.TensorSpec("t", t.dtype, (10,))], lambda s: iter([t]))
    entry = st.read_checkpoint(tmp_path)["t"]
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError, match=r"model.safetensors: file ends at byte \d+, inside a tensor"):
            st.pread_into(fd, torch.empty(20), entry.offset, entry.path)
    finally:
        os.close(fd)


def test_shard_plan_big_tensor_alone():
    plan = st.shard_plan({"a": 4, "b": 4, "big": 100, "c": 4, "d": 8}, max_shard_bytes=10)
    assert plan == [["big"], ["a", "b"], ["c"], ["d"]]  # huggingface_hub's order: the big one is emitted at once


def test_names_and_dtype_tables():
    assert st.shard_names(1) == ["model.safetensors"]
    assert st.shard_names(3)[1] == "model-00002-of-00003.safetensors"
    assert all(st.DTYPE_BY_NAME[st.NAME_BY_DTYPE[d]] == d for d in st.NAME_BY_DTYPE)
    assert st.dtype_name(torch.bfloat16) == "bfloat16" and set(st.WEIGHT_DTYPES.values()) <= set(st.NAME_BY_DTYPE)


# --- header validation against the reference implementation ---------------------------------------------------


def _reference_accepts(path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except SafetensorError:
        return False
    return True


def _we_accept(path) -> bool:
    try:
        st.read_header(path)
    except CheckpointError:
        return False
    return True


def _variants(raw: bytes) -> dict[str, bytes]:
    """A small file written by safetensors itself, edited the ways a download or a hand edit breaks one."""
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + n], raw[8 + n :]
    parsed = json.loads(header)

    def with_header(h: dict | str, tail: bytes = b"") -> bytes:
        text = (h if isinstance(h, str) else json.dumps(h)).encode()
        return struct.pack("<Q", len(text)) + text + data + tail

    def edited(**edits) -> dict:
        h = json.loads(header)
        for key, value in edits.items():
            h["w"][key] = value
        return h

    out = {f"length {k:+d}": struct.pack("<Q", n + k) + raw[8:] for k in range(-12, 13) if k}
    out |= {
        "as written": raw,
        "trailing tab and newline": with_header(json.dumps(parsed) + "\t\n"),
        "metadata null": with_header({**parsed, "__metadata__": None}),
        "unknown field in an entry": with_header(edited(note="x")),
        "bytes appended": with_header(parsed, b"\0" * 8),
        "bytes missing": with_header(parsed)[:-4],
        "metadata value not a string": with_header({**parsed, "__metadata__": {"format": 1}}),
        "bool in a shape": with_header(edited(shape=[*parsed["w"]["shape"], True])),
        "float in a shape": with_header(edited(shape=[float(d) for d in parsed["w"]["shape"]])),
        "negative offset": with_header(edited(data_offsets=[-1, parsed["w"]["data_offsets"][1]])),
        "offsets reversed": with_header(edited(data_offsets=parsed["w"]["data_offsets"][::-1])),
        "three offsets": with_header(edited(data_offsets=[*parsed["w"]["data_offsets"], 0])),
        "shape too big": with_header(edited(shape=[d * 2 for d in parsed["w"]["shape"]])),
        "NaN": with_header(json.dumps({**parsed, "__metadata__": {"x": float("nan")}})),
        "not an object": with_header("[]"),
        "UTF-16": with_header(json.dumps(parsed).encode("utf-16").decode("latin-1")),
    }
    return out


def test_header_rules_refuse_whatever_safetensors_refuses(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "ref.safetensors"
    save_file({"w": torch.randn(6, 5), "b": torch.arange(3), "z": torch.zeros(0, 4)}, src, metadata={"format": "pt"})
    stricter = []
    for name, blob in _variants(src.read_bytes()).items():
        path = tmp_path / "x.safetensors"
        path.write_bytes(blob)
        ours, reference = _we_accept(path), _reference_accepts(path)
        assert ours <= reference, name  # never accept what the reference refuses
        if ours != reference:
            stricter.append(name)
        if name.startswith("length"):
            assert not ours, name  # every wrong header length is caught, none is read a few bytes off
    assert stricter == []
    assert _we_accept(src)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: " " + text, r"does not start with '\{'"),  # the README: the header begins with {
        (lambda text: text[:-1] + ', "b": {"dtype": "I64", "shape": [3], "data_offsets": [0, 24]}}', "'b' twice"),
    ],
    ids=["leading space", "duplicate key"],
)
def test_header_rules_the_readme_asks_for(tmp_path, edit, message):
    # safetensors 0.8 accepts both (it keeps one of two duplicate keys); the format says neither is valid.
    from safetensors.torch import save_file

    src = tmp_path / "ref.safetensors"
    save_file({"b": torch.arange(3)}, src)
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = edit(raw[8 : 8 + n].decode().rstrip()).encode()
    src.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    with pytest.raises(CheckpointError, match=message):
        st.read_header(src)
