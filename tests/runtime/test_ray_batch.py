"""`batch --ray` on a local 2-CPU Ray cluster: the local command's lines, resume, a corrupt image as an error row."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from lowmem_paligemma.cli import main
from lowmem_paligemma.errors import InsufficientMemoryError
from lowmem_paligemma.runtime.batch import BatchJob
from lowmem_paligemma.runtime.session import LoadOptions, SamplingOptions, session_memory_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' (make test installs it)")
    # Workers import this checkout's package; one OpenMP thread each (a tiny model gains nothing from more).
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": env})  # fmt: skip
    yield ray
    ray.shutdown()


def _run(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stderr


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answers(records: list[dict]) -> dict[str, dict]:
    return {r["path"]: {k: v for k, v in r.items() if k not in ("seconds", "batch")} for r in records}


def test_ray_gives_the_local_lines_skips_recorded_and_records_a_corrupt_image(
    cluster, tiny_pg1_dir, tmp_path, monkeypatch
):
    reads = []  # the read's arguments: one read task in flight per worker (ray_batch.READS_PER_WORKER)
    read_binary_files = cluster.data.read_binary_files
    monkeypatch.setattr(
        cluster.data, "read_binary_files", lambda *a, **kw: reads.append(kw) or read_binary_files(*a, **kw)
    )
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (24, 24), (64, 16), (30, 50)]):
        Image.radial_gradient("L").resize(size).rotate(40 * i).convert("RGB").save(folder / f"{i}.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    common = ["caption en", "--dtype", "float32", "--max-new-tokens", 8, "--batch-size", 2]
    local = tmp_path / "local.jsonl"
    _run("batch", tiny_pg1_dir, folder, *common, "--out", local)
    want = _records(local)
    assert len(want) == 5 and sum("error" in r for r in want) == 1

    # An earlier run recorded two answers; Ray does the rest and leaves those lines alone.
    distributed = tmp_path / "ray.jsonl"
    earlier = "".join(json.dumps(r) + "\n" for r in want[:2])
    distributed.write_text(earlier)
    stderr = _run("batch", tiny_pg1_dir, folder, *common, "--out", distributed, "--ray", "--workers", 1,
                  "--worker-cpus", 1)  # fmt: skip
    assert "2 already answered" in stderr and "Ray: 1 worker(s), each 1 CPU(s)" in stderr
    assert [(r["concurrency"], r["num_cpus"]) for r in reads] == [(1, 0)]
    assert distributed.read_text().startswith(earlier)
    got = _records(distributed)
    assert len(got) == 5 and _answers(got) == _answers(want)  # same lines, order aside, each image once
    corrupt = next(r for r in got if r["image"] == "corrupt.jpg")
    assert "corrupt.jpg: not a readable image" in corrupt["error"] and "corrupt.jpg" in stderr


def test_worker_resources_come_from_the_loader_estimate(cluster, tiny_pg2_dir):
    from lowmem_paligemma.runtime.ray_batch import worker_resources

    load, sampling = LoadOptions(dtype="bfloat16"), SamplingOptions(max_new_tokens=20)
    job = BatchJob.of(tiny_pg2_dir, "caption en", sampling, load)
    resources = worker_resources(tiny_pg2_dir, load, job, sampling, batch_size=4, workers=1)
    assert resources.memory == session_memory_bytes(tiny_pg2_dir, load, "caption en", sampling, 4)
    assert (resources.cpus, resources.gpus) == (2, 0)  # the cluster's CPUs, shared out over one worker
    assert worker_resources(tiny_pg2_dir, load, job, sampling, batch_size=4, workers=2).cpus == 1
    for device in ("cuda", "cuda:1"):  # a GPU load asks Ray for one GPU a worker, whichever the name
        gpu = LoadOptions(dtype="bfloat16", device=device)
        assert worker_resources(tiny_pg2_dir, gpu, job, sampling, batch_size=4, workers=1).gpus == 1
    with pytest.raises(InsufficientMemoryError, match="largest Ray node"):
        worker_resources(tiny_pg2_dir, load, job, sampling, batch_size=10**6, workers=1)


def test_the_cli_does_not_import_ray():
    code = "import sys, lowmem_paligemma.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_ray_is_needed_only_with_ray(tiny_pg1_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    shutil.copy(Path(__file__), tmp_path / "x.png")
    result = CliRunner().invoke(main, ["batch", str(tiny_pg1_dir), str(tmp_path), "x", "--out", "r", "--ray"])
    assert result.exit_code == 1 and "pip install 'lowmem_paligemma[ray]'" in result.stderr


def test_an_address_where_nothing_answers_is_one_error_line_at_once(tiny_pg1_dir, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' (make test installs it)")
    import socket
    import time

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh CLI process, whatever ran before here

    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.copy(Path(__file__), tmp_path / "x.png")
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, ["batch", str(tiny_pg1_dir), str(tmp_path), "x", "--out", str(tmp_path / "r"),
                                       "--ray", "--ray-address", f"127.0.0.1:{port}"])  # fmt: skip
    assert time.perf_counter() - t0 < 60  # Ray alone retries a dead address for minutes
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: nothing answers at 127.0.0.1:{port} (Connection refused): is the Ray cluster "
                      "running? (`ray start --head` on its head node; docs/batch.md)"]  # fmt: skip


def test_a_refused_connection_names_token_authentication(monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' (make test installs it)")
    from lowmem_paligemma.errors import ClusterError
    from lowmem_paligemma.runtime.ray_batch import connect

    def refuse(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("lowmem_paligemma.runtime.ray_batch._check_reachable", lambda address: None)
    with pytest.raises(
        ClusterError, match=r"^Failed to connect to Ray cluster at 10\.0\.0\.1:6379\. .*RAY_AUTH_MODE=token"
    ):
        connect("10.0.0.1:6379")
