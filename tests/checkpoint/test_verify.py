"""verify.py: shard checksums against a sums file, the Hub's local-dir download metadata, or a Hub cache snapshot.

The point of it: a flipped byte inside a weight passes every header check and loads a different model; only a
checksum from elsewhere catches it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from huggingface_hub._local_folder import write_download_metadata

from lowmem_paligemma import CheckpointError, load_model
from lowmem_paligemma.checkpoint.safetensors_io import read_checkpoint
from lowmem_paligemma.checkpoint.verify import verify_checkpoint


@pytest.fixture
def ckpt(tiny_pg1_dir, tmp_path) -> Path:
    return shutil.copytree(tiny_pg1_dir, tmp_path / "ckpt")


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_sums(d: Path, out: Path) -> Path:
    out.write_text("".join(f"{_sha256(p)}  ./{p.name}\n" for p in _shards(d)))  # as `sha256sum ./*` writes them
    return out


def _flip_a_weight_byte(d: Path) -> Path:
    """One byte inside a tensor's data: the header stays valid, the model changes."""
    entry = max(read_checkpoint(d).values(), key=lambda e: e.nbytes)
    raw = bytearray(entry.path.read_bytes())
    raw[entry.offset + entry.nbytes // 2] ^= 0x40
    entry.path.write_bytes(bytes(raw))
    return entry.path


def test_a_sums_file_catches_what_header_checks_cannot(ckpt, tmp_path):
    sums = _write_sums(ckpt, tmp_path / "SHA256SUMS")
    assert sorted(verify_checkpoint(ckpt, sums)) == [ckpt / p.name for p in _shards(ckpt)]
    before = load_model(ckpt, dtype=torch.float32).model.state_dict()
    broken = _flip_a_weight_byte(ckpt)
    after = load_model(ckpt, dtype=torch.float32).model.state_dict()  # loads: the headers are still valid
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(CheckpointError, match=rf"{broken.name}: checksum [0-9a-f]{{16}}\.\.\. differs .*SHA256SUMS"):
        load_model(ckpt, verify=sums)


def test_hub_local_dir_metadata(ckpt):
    # Written by huggingface_hub itself, in the format `huggingface-cli download --local-dir` leaves.
    for p in _shards(ckpt):
        write_download_metadata(ckpt, p.name, commit_hash="0" * 40, etag=_sha256(p))
    assert len(verify_checkpoint(ckpt)) == len(_shards(ckpt))
    load_model(ckpt, verify=True)
    broken = _flip_a_weight_byte(ckpt)
    with pytest.raises(CheckpointError, match=rf"{broken.name}: checksum .* the Hub's download records"):
        load_model(ckpt, verify=True)


def test_small_files_carry_a_git_blob_sha1(ckpt):
    for p in _shards(ckpt):
        git_sha1 = subprocess.run(["git", "hash-object", str(p)], capture_output=True, text=True, check=True).stdout
        write_download_metadata(ckpt, p.name, commit_hash="0" * 40, etag=git_sha1.strip())
    verify_checkpoint(ckpt)
    _flip_a_weight_byte(ckpt)
    with pytest.raises(CheckpointError, match="differs"):
        verify_checkpoint(ckpt)


def test_hub_cache_snapshot_links(tiny_pg1_dir, tmp_path):
    repo = tmp_path / "models--google--paligemma-tiny"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_pg1_dir.iterdir():
        blob = blobs / _sha256(f)
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    verify_checkpoint(snapshot)  # the link targets are named by their sha256
    want = load_model(tiny_pg1_dir, dtype=torch.float32).model.state_dict()
    got = load_model(snapshot, dtype=torch.float32, verify=True).model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    blob = next(b for b in blobs.iterdir() if b.stat().st_size > 50_000)
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 1
    blob.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="differs"):
        verify_checkpoint(snapshot)


def test_missing_or_malformed_sums_are_refused(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"no checksum to compare with: no .cache/huggingface/download/model-"):
        verify_checkpoint(ckpt)
    sums = _write_sums(ckpt, tmp_path / "SUMS")
    sums.write_text("".join(sums.read_text().splitlines(keepends=True)[1:]))  # the first shard left out
    with pytest.raises(CheckpointError, match=r"SUMS holds no sha256 for model-00001"):
        verify_checkpoint(ckpt, sums)
    sums.write_text("not a sums line\n")
    with pytest.raises(CheckpointError, match="line 1 is not"):
        verify_checkpoint(ckpt, sums)
