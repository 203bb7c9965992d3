"""`batch --ray`: the local batch command's work spread over a Ray cluster with Ray Data (docs/batch.md).

- The driver lists the images (batch.list_image_paths: a local folder or a URI that pyarrow reads) and
  keeps those the results file does not answer yet (batch.plan_run); Ray reads them on the cluster
  (`read_binary_files`), so every path must be readable where the workers run.
- `map_batches` with `BatchWorker`, a callable class: one model per actor, loaded by `load_session` with
  the `LoadOptions` passed whole, so every load option reaches the workers as it is. Each actor asks Ray
  for `session_memory_bytes` (the loader's pre-flight estimate plus the batch's working memory) and for
  its CPUs, which torch takes as its thread count (Ray sets OMP_NUM_THREADS to them).
- The records come back to the driver, which appends them with the local command's writer: the same
  lines, the same resume; a corrupt image is decoded by the actor into an error row, never a failed job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ClusterError, InsufficientMemoryError
from ..model.sampling import SamplingOptions
from ..pretrained.options import LoadOptions
from ..units import format_bytes
from .batch import BatchJob, answer_batch, prepare_image, write_records
from .session import load_session, session_memory_bytes

# Reading image bytes takes no CPU worth reserving; with 1 CPU per read task, actors holding every CPU
# would leave the reads unschedulable and the job would wait forever.
READ_TASK_CPUS = 0
# Read tasks in flight per worker. 0-CPU tasks are otherwise all started at once, each in a worker process
# of its own (each start takes CPU from the actors loading their models); a worker answers
# a batch in seconds and its batch is read in milliseconds, so one read at a time per worker keeps up.
READS_PER_WORKER = 1


class BatchWorker:
    """One Ray actor: a model loaded once, then `answer_batch` on every batch of image bytes Ray hands it."""

    def __init__(self, model_dir: str, load: LoadOptions, job: BatchJob, sampling: SamplingOptions):
        self.session = load_session(model_dir, load)
        self.job = job
        self.sampling = sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        processor = self.session.processor
        items = [
            (str(p), prepare_image(processor, str(p), bytes(data))) for p, data in zip(batch["path"], batch["bytes"])
        ]
        records = answer_batch(self.session, self.job, self.sampling, items)
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records], dtype=object)}


def _bare(path: str) -> str:
    """A path without its URI scheme: Ray reports `s3://b/x.png` as `b/x.png`, `file:///x.png` as `/x.png`."""
    return path.split("://", 1)[1] if "://" in path else path


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port address (with or without a scheme) must accept a TCP connection: Ray itself would retry a
    dead address for minutes before failing."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port; Ray judges it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"nothing answers at {address} ({e.strerror or e}): is the Ray cluster running? "
            "(`ray start --head` on its head node; docs/batch.md)"
        ) from None


def connect(address: str | None) -> None:
    """Join the cluster at `address` ("auto", "ray://host:10001", "host:6379"); None: the one `ray start` left
    on this machine, else a new local one. A process already connected keeps its connection."""
    import ray

    if ray.is_initialized():
        return
    if address not in (None, "auto"):
        _check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        # Ray >= 2.5x: `ray start` turns on token authentication when ~/.ray/auth_token exists, and a driver
        # given an explicit address sends the token only when told to (RAY_AUTH_MODE=token).
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(
            f"{first}. If the cluster uses token authentication, set RAY_AUTH_MODE=token here, with its token in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN (docs/batch.md)"
        ) from None


@dataclass(frozen=True)
class WorkerResources:
    """What each worker actor asks Ray for."""

    cpus: int  # also torch's thread count in the actor
    memory: int  # bytes: runtime.session_memory_bytes
    gpus: int

    def describe(self, workers: int) -> str:
        gpus = f", {self.gpus} GPU" if self.gpus else ""
        return f"Ray: {workers} worker(s), each {self.cpus} CPU(s){gpus} and {format_bytes(self.memory)} of memory"


def worker_resources(
    model_dir: str | os.PathLike,
    load: LoadOptions,
    job: BatchJob,
    sampling: SamplingOptions,
    batch_size: int,
    workers: int,
    cpus: int | None = None,
) -> WorkerResources:
    """Each worker's request, checked against the connected cluster's nodes (Ray would wait forever for a
    worker no node can hold). CPUs default to the cluster's shared out, at most one node's worth."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if cpus is None:
        per_node = [r.get("CPU", 0) for r in nodes]
        cpus = max(1, int(min(max(per_node), sum(per_node) // workers)))
    memory = session_memory_bytes(model_dir, load, job.prompt, sampling, batch_size)
    if not any(r.get("memory", 0) >= memory and r.get("CPU", 0) >= cpus for r in nodes):
        biggest = max(r.get("memory", 0) for r in nodes)
        raise InsufficientMemoryError(
            f"a worker needs {format_bytes(memory)} of memory and {cpus} CPU(s); the largest Ray node offers "
            f"{format_bytes(biggest)}. Use a smaller --batch-size or --worker-cpus, a 16-bit --dtype, or bigger nodes"
        )
    return WorkerResources(cpus, memory, 1 if load.device.partition(":")[0] == "cuda" else 0)  # "cuda", "cuda:N"


def run_ray_batch(
    model_dir: str | os.PathLike,
    paths: list[str],
    job: BatchJob,
    sampling: SamplingOptions,
    load: LoadOptions,
    results: Path,
    resources: WorkerResources,
    *,
    batch_size: int = 1,
    workers: int = 1,
    progress: bool = False,
    on_error: Callable[[str], None] | None = None,
) -> int:
    """Answer `paths` on the connected cluster with `workers` actors; append the records to `results` as they
    come back. Returns the number of error rows; `progress` and `on_error` as in batch.run_batch."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, on the driver
    dataset = ray.data.read_binary_files(
        paths, include_paths=True, num_cpus=READ_TASK_CPUS, concurrency=READS_PER_WORKER * workers
    )
    dataset = dataset.map_batches(
        BatchWorker,
        fn_constructor_kwargs={"model_dir": str(Path(model_dir).absolute()), "load": load, "job": job,
                               "sampling": sampling},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=resources.cpus, num_gpus=resources.gpus, memory=resources.memory,
    )  # fmt: skip
    canonical = {_bare(p): p for p in paths}  # records carry the path as listed, whatever Ray reports

    def batches() -> Iterator[list[dict]]:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            records = [json.loads(line) for line in batch["record"]]
            for record in records:
                record["path"] = canonical.get(_bare(record["path"]), record["path"])
            yield records

    return write_records(results, batches(), len(paths), progress, on_error)
