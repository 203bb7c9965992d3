"""Malformed checkpoints: each case is one readable error naming the file, raised before any allocation.

(The CLI side, one `Error:` line and a non-zero exit, is in test_cli.py.)
"""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

import lowmem_paligemma.checkpoint.loader as loader
from lowmem_paligemma import CheckpointError, LowmemError, load_model


@pytest.fixture
def ckpt(tiny_pg1_dir, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    return shutil.copytree(tiny_pg1_dir, tmp_path / "ckpt")


def _shards(d):
    return sorted(d.glob("model-*.safetensors"))


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _truncate(d):
    path = _shards(d)[0]
    path.write_bytes(path.read_bytes()[:-100])


def _header_too_long(d):
    path = _shards(d)[0]
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])


def _overlap(d):
    def edit(h):
        keys = [k for k in h if k != "__metadata__"]
        begin, end = h[keys[1]]["data_offsets"]
        start = h[keys[0]]["data_offsets"][0] + 4  # same length, now starting inside the first tensor
        h[keys[1]]["data_offsets"] = [start, start + end - begin]

    _rewrite_header(_shards(d)[-1], edit)  # the last shard holds many small tensors


def _out_of_range(d):
    def edit(h):
        k = _first_tensor(h)
        begin, end = h[k]["data_offsets"]
        h[k]["data_offsets"] = [begin + 10**9, end + 10**9]

    _rewrite_header(_shards(d)[0], edit)


def _unknown_dtype(d):
    _rewrite_header(_shards(d)[0], lambda h: h[_first_tensor(h)].update(dtype="F8_E4M3X"))


def _shape_vs_bytes(d):
    _rewrite_header(_shards(d)[0], lambda h: h[_first_tensor(h)].update(shape=[3, 5, 7]))


def _not_json(d):
    path = _shards(d)[0]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])


def _missing_shard(d):
    _shards(d)[-1].unlink()


def _index_outside(d):
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../../etc/passwd"
    index.write_text(json.dumps(data))


def _bin_only(d):
    for p in _shards(d):
        p.unlink()
    (d / "model.safetensors.index.json").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")


def _broken_config(d):
    (d / "config.json").write_text('{"model_type": "paligemma", "text_config": ')


def _config_wrong_shape(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 1
    (d / "config.json").write_text(json.dumps(cfg))


def _raw_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def _write_raw(path, header_text, data, length=None):
    blob = header_text if isinstance(header_text, bytes) else header_text.encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _length_one_short(d):
    # Padded with 8 more spaces so the JSON still parses when one byte less of it is read: the file is then
    # read one byte off, which only the exact tiling of the data section catches.
    path = _shards(d)[0]
    header, data = _raw_header(path)
    _write_raw(path, header + b" " * 8, data, length=len(header) + 7)


def _length_one_long(d):
    path = _shards(d)[0]
    header, data = _raw_header(path)
    _write_raw(path, header, data, length=len(header) + 1)


def _leading_space(d):
    path = _shards(d)[0]
    header, data = _raw_header(path)
    _write_raw(path, b" " + header.rstrip(), data)


def _duplicate_key(d):
    path = _shards(d)[0]
    header, data = _raw_header(path)
    parsed = json.loads(header)
    key = _first_tensor(parsed)
    text = header.decode().rstrip()[:-1] + f", {json.dumps(key)}: {json.dumps(parsed[key])}}}"
    _write_raw(path, text, data)


def _gap(d):
    def edit(h):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
        begin, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [begin + 8, end + 8]

    path = _shards(d)[-1]  # the last shard holds many small tensors
    _rewrite_header(path, edit)
    with path.open("ab") as f:
        f.write(bytes(8))


def _appended(d):
    with _shards(d)[0].open("ab") as f:
        f.write(b"\0" * 16)


def _metadata_not_strings(d):
    _rewrite_header(_shards(d)[0], lambda h: h.update(__metadata__={"format": 1}))


def _bool_in_shape(d):
    def edit(h):
        h[_first_tensor(h)]["shape"].append(True)  # [.., true] holds as many elements in Python, not in JSON

    _rewrite_header(_shards(d)[0], edit)


def _offsets_a_string(d):
    _rewrite_header(_shards(d)[0], lambda h: h[_first_tensor(h)].update(data_offsets="01"))


def _nan_in_header(d):
    _rewrite_header(_shards(d)[0], lambda h: h.update(__metadata__={"format": "pt", "x": float("nan")}))


def _ints_for_floats(d):
    _rewrite_header(_shards(d)[0], lambda h: h[_first_tensor(h)].update(dtype="I32"))  # same size as F32


def _edit_index(d, edit):
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))


def _index_moves_a_tensor(d):
    def edit(weight_map):
        last = sorted(weight_map.values())[-1]  # a shard of many tensors: it stays listed
        key = next(k for k, v in weight_map.items() if v == last)
        weight_map[key] = next(v for v in weight_map.values() if v != last)

    _edit_index(d, edit)


def _index_lists_a_ghost(d):
    _edit_index(d, lambda weight_map: weight_map.update(ghost=next(iter(weight_map.values()))))


def _index_omits_a_tensor(d):
    _edit_index(d, lambda weight_map: weight_map.pop(sorted(weight_map)[-1]))


def _index_duplicate_key(d):
    index = d / "model.safetensors.index.json"
    text = index.read_text().rstrip()
    key, shard = next(iter(json.loads(text)["weight_map"].items()))
    index.write_text(text.replace('"weight_map": {', f'"weight_map": {{"{key}": "{shard}", ', 1))


CASES = {
    "truncated shard": (_truncate, r"model-00001.*outside the data .*truncated"),
    "header length beyond the file": (_header_too_long, r"model-00001.*header length .* past the end"),
    "overlapping offsets": (_overlap, r"model-0000\d.*overlap"),
    "out-of-range offsets": (_out_of_range, r"model-00001.*outside the data"),
    "unknown dtype": (_unknown_dtype, r"model-00001.*unsupported dtype 'F8_E4M3X'"),
    "shape vs bytes": (_shape_vs_bytes, r"model-00001.*shape \[3, 5, 7\] .* needs .* bytes"),
    "header not JSON": (_not_json, r"model-00001.*not valid JSON"),
    "missing shard": (_missing_shard, r"index.json: shard 'model-0000\d-of-0000\d.safetensors' is missing"),
    "index outside the directory": (_index_outside, r"index.json: shard '../../etc/passwd' points outside"),
    ".bin only": (_bin_only, r"only PyTorch pickle \(.bin\) weights .* never unpickled.*save_pretrained"),
    "broken config.json": (_broken_config, r"config.json: not valid JSON"),
    "config disagrees with the weights": (_config_wrong_shape, r"up_proj.weight' has shape .* expects"),
    "header length one short": (_length_one_short, r"model-00001.*tensors end at data byte (\d+) but the file holds"),
    "header length one long": (_length_one_long, r"model-00001.*(not valid JSON|outside the data)"),
    "header starts with a space": (_leading_space, r"model-00001.*does not start with '\{'"),
    "duplicate key in a header": (_duplicate_key, r"model-00001.*header names '.*' twice"),
    "gap between tensors": (_gap, r"model-00009.*8 unaccounted bytes after"),
    "bytes appended": (_appended, r"model-00001.*file holds \d+ data bytes"),
    "metadata not strings": (_metadata_not_strings, r"model-00001.*__metadata__ is not a map of strings"),
    "bool in a shape": (_bool_in_shape, r"model-0000\d.*malformed shape or offsets"),
    "offsets a string": (_offsets_a_string, r"model-00001.*malformed header entry"),
    "NaN in a header": (_nan_in_header, r"model-00001.*not valid JSON"),
    "int dtype for a float weight": (_ints_for_floats, r"model-00001.*stored as int32, not floats"),
    "index moves a tensor": (_index_moves_a_tensor, r"index.json: weight_map puts '.*' in 'model-.*', which does not"),
    "index lists a ghost": (_index_lists_a_ghost, r"index.json: weight_map lists 'ghost', which no shard holds"),
    "index omits a tensor": (_index_omits_a_tensor, r"index.json: the weight_map does not list '.*'"),
    "index names a key twice": (_index_duplicate_key, r"index.json: names '.*' twice"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_checkpoint_is_refused_before_allocation(ckpt, case, monkeypatch):
    breaker, message = CASES[case]
    breaker(ckpt)
    allocated = []
    original = loader.materialize
    monkeypatch.setattr(loader, "materialize", lambda *a: allocated.append(1) or original(*a))
    with pytest.raises(LowmemError, match=message) as err:  # CheckpointError, or ConfigError for config.json
        load_model(ckpt)
    assert "\n" not in str(err.value)
    assert allocated == []  # refused from the headers alone: no model was ever allocated


def test_data_corrupted_after_validation_names_the_file(ckpt, monkeypatch):
    """A read that fails mid-stream (file shrunk after the headers were read) is still one line with the file."""
    real = loader.read_checkpoint

    def shrink_then_read(d):
        entries = real(d)
        _truncate(d)
        return entries

    monkeypatch.setattr(loader, "read_checkpoint", shrink_then_read)
    with pytest.raises(CheckpointError, match=r"model-00001.*file ends at byte \d+, inside a tensor"):
        load_model(ckpt)


def test_duplicate_tensor_across_shards(ckpt):
    first = _shards(ckpt)[0]
    save_file({"multi_modal_projector.linear.bias": torch.zeros(64)}, ckpt / "extra.safetensors")
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["zzz"] = "extra.safetensors"
    index.write_text(json.dumps(data))
    assert first.exists()
    with pytest.raises(CheckpointError, match=r"multi_modal_projector.linear.bias' is also stored in"):
        load_model(ckpt)
