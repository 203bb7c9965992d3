"""resolve_model_dir: local directories as before, and Hub ids found in a Hugging Face cache that huggingface_hub's own
`snapshot_download` filled from a fake Hub served here (no internet in the test run).

The fake Hub answers what `snapshot_download` asks, and no more (read from huggingface_hub 2.4's _snapshot_download.py
and file_download.py; a later huggingface_hub that asks for more makes the fixtures fail, not the assertions):
- GET /api/models/<repo>/revision/<rev>: the model info, of which only `sha` (the commit) is read;
- GET /api/models/<repo>/tree/<commit>: the file listing (one page, no Link header), written to trees/<commit>.json;
- HEAD and GET /<repo>/resolve/<rev>/<file>: X-Repo-Commit and ETag (the blob's name in the cache) are required;
  no X-Xet-Hash, so the bytes come by plain GET.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
import torch
from huggingface_hub import constants, hf_hub_download, snapshot_download

from lowmem_paligemma import load_model
from lowmem_paligemma.errors import CheckpointError
from lowmem_paligemma.model.config import load_config
from lowmem_paligemma.pretrained.model_dir import resolve_model_dir

REPO = "lowmem-test/tiny-paligemma"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NOT_CACHED = "google/paligemma2-3b-mix-224"
T = TypeVar("T")


@dataclass
class FakeHub:
    url: str
    requests: list[str]  # "METHOD /path", every request served


class _HubHandler(BaseHTTPRequestHandler):
    files: dict[str, bytes]  # set per server, on a subclass
    requests: list[str]
    timeout = 10  # seconds a connection may idle: a stuck client cannot hold a server thread

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        path, api = urlsplit(self.path).path, f"/api/models/{REPO}"
        file = re.fullmatch(rf"/{REPO}/resolve/(?:main|{COMMIT})/(.+)", path)
        if path in (f"{api}/revision/main", f"{api}/revision/{COMMIT}"):
            self._send(json.dumps({"id": REPO, "sha": COMMIT}).encode(), {"Content-Type": "application/json"}, body)
        elif path == f"{api}/tree/{COMMIT}":
            listing = [{"type": "file", "path": name, "size": len(data), "oid": _git_blob_id(data)}
                       for name, data in self.files.items()]  # fmt: skip
            self._send(json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
        elif file is not None and file[1] in self.files:
            data = self.files[file[1]]
            self._send(data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)
        else:
            self._send(b"not found", {"X-Error-Code": "RepoNotFound"}, body, status=404)

    def _send(self, data: bytes, headers: dict[str, str], body: bool, status: int = 200) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # the requests are recorded, not printed
        pass


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _bounded(fn: Callable[[], T], seconds: float = 60) -> T:
    """fn() in a daemon thread, failing the test if it runs over: huggingface_hub's API calls have no timeout."""
    out: dict[str, T | BaseException] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the download from the fake Hub ran over {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _download(hub: FakeHub, cache: Path, filename: str | None = None) -> Path:
    """The real snapshot_download (or hf_hub_download of one file) from the fake Hub into `cache`: the snapshot."""
    kwargs = {"cache_dir": cache, "endpoint": hub.url, "token": False, "etag_timeout": 10}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite may run under HF_HUB_OFFLINE=1; this Hub is local
        if filename is not None:
            return Path(_bounded(lambda: hf_hub_download(REPO, filename, **kwargs))).parent
        return Path(_bounded(lambda: snapshot_download(REPO, max_workers=2, **kwargs)))


@pytest.fixture(scope="module")
def hub(tiny_pg1_dir: Path) -> Iterator[FakeHub]:
    files = {f.name: f.read_bytes() for f in sorted(tiny_pg1_dir.iterdir())}
    requests: list[str] = []
    handler = type("Handler", (_HubHandler,), {"files": files, "requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # its request threads are daemons
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield FakeHub(f"http://127.0.0.1:{server.server_port}", requests)
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def snapshot(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REPO's snapshot in a cache of its own, downloaded once (tests that damage a snapshot download their own)."""
    return _download(hub, tmp_path_factory.mktemp("hf") / "hub")


@pytest.fixture
def cache(snapshot: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache holding REPO, as the one in use; online, with the fake Hub as the endpoint, so a network call by
    resolve_model_dir would reach it and be recorded."""
    cache = snapshot.parents[2]  # <cache>/models--<ns>--<name>/snapshots/<commit>
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, at import, from HF_HUB_CACHE / HF_HOME
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def test_the_fake_hub_filled_a_real_cache(snapshot, tiny_pg1_dir):
    assert snapshot.parent.parent.name == "models--lowmem-test--tiny-paligemma" and snapshot.name == COMMIT
    assert (snapshot.parents[1] / "refs" / "main").read_text() == COMMIT
    assert (snapshot.parents[1] / "trees" / f"{COMMIT}.json").is_file()  # the listing an incomplete snapshot fails
    for f in tiny_pg1_dir.iterdir():
        link = snapshot / f.name
        assert link.is_symlink() and link.read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_id_is_its_cached_snapshot_without_a_network_call(
    cache, snapshot, hub, tiny_pg1_dir, monkeypatch, offline
):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    served = len(hub.requests)
    for spec in (REPO, f"{REPO}@main", f"{REPO}@{COMMIT}"):
        assert resolve_model_dir(spec) == snapshot, spec
    assert hub.requests[served:] == []
    assert load_config(resolve_model_dir(REPO)) == load_config(tiny_pg1_dir)


def test_the_model_loads_from_the_cached_snapshot(cache, tiny_pg1_dir):
    want = load_model(tiny_pg1_dir, dtype=torch.float32).model.state_dict()
    got = load_model(REPO, dtype=torch.float32).model.state_dict()  # load_model resolves the id itself
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_an_id_not_in_the_cache_says_how_to_download_it(cache):
    with pytest.raises(CheckpointError) as e:
        resolve_model_dir(NOT_CACHED)
    assert str(e.value) == (
        f"{NOT_CACHED}: no such directory, and Hub model id {NOT_CACHED} is not in the Hugging Face cache ({cache}); "
        f"accept its license at https://huggingface.co/{NOT_CACHED}, log in (hf auth login), "
        f"then download it: hf download {NOT_CACHED}"
    )
    with pytest.raises(
        CheckpointError, match=rf"{REPO} \(revision v2\) is not in .* hf download {REPO} --revision v2$"
    ):
        resolve_model_dir(f"{REPO}@v2")


def test_the_download_command_named_is_the_one_installed():
    (hf,) = entry_points(group="console_scripts", name="hf")
    assert hf.value.startswith("huggingface_hub.")


def test_a_local_directory_wins_over_a_hub_id(cache, tiny_pg1_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_pg1_dir, tmp_path / REPO)
    assert resolve_model_dir(REPO) == Path(REPO)
    assert resolve_model_dir(Path(REPO)) == Path(REPO)
    (tmp_path / "lowmem-test" / "tiny.partial").mkdir()  # refused as a convert's leftover, not looked up
    with pytest.raises(CheckpointError, match="unfinished output of a `convert`"):
        resolve_model_dir("lowmem-test/tiny.partial")


def test_an_incomplete_snapshot_is_refused(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "listed"))
    snapshot = _download(hub, tmp_path / "listed")  # its listing names every file
    (snapshot / "model-00003-of-00009.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"^{REPO}: the download .* is incomplete \({snapshot} lacks files"):
        resolve_model_dir(REPO)

    # File by file, as `hf download <id> <file>` does: no listing, so the checkpoint itself is checked.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "unlisted"))
    snapshot = _download(hub, tmp_path / "unlisted", "model.safetensors.index.json")
    assert not (snapshot.parents[1] / "trees").exists()
    with pytest.raises(CheckpointError, match=rf"incomplete \({snapshot} has no config.json\); .* hf download {REPO}$"):
        resolve_model_dir(REPO)
    _download(hub, tmp_path / "unlisted", "config.json")
    with pytest.raises(CheckpointError, match=r"incomplete \(.*shard 'model-00001-of-00009.safetensors' is missing"):
        resolve_model_dir(REPO)


def test_local_paths_keep_their_messages(tmp_path):
    with pytest.raises(CheckpointError) as e:
        resolve_model_dir(tmp_path / "nope")
    assert str(e.value) == f"{tmp_path / 'nope'}: no such directory"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file: not a directory; pass the model directory"):
        resolve_model_dir(tmp_path / "file")
    (tmp_path / "out.partial").mkdir()
    with pytest.raises(CheckpointError, match=r"out.partial: the unfinished output of a `convert`"):
        resolve_model_dir(tmp_path / "out.partial")
    with pytest.raises(CheckpointError) as e:  # reads as an id, but huggingface_hub refuses "--" in one
        resolve_model_dir("lowmem-test/bad--name")
    assert str(e.value) == "lowmem-test/bad--name: no such directory"


def test_a_fresh_process_finds_the_cache_by_hf_home_offline(hub, tmp_path):
    # HF_HOME/hub is the default cache; huggingface_hub reads it at import, which only a fresh process shows.
    snapshot = _download(hub, tmp_path / "home" / "hub")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env |= {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url}
    code = (
        "import json, sys\n"
        "from lowmem_paligemma.errors import CheckpointError\n"
        "from lowmem_paligemma.pretrained.model_dir import resolve_model_dir\n"
        "lazy = 'huggingface_hub' not in sys.modules\n"
        f"found = str(resolve_model_dir({REPO!r}))\n"
        f"try:\n    resolve_model_dir({NOT_CACHED!r})\n"
        "except CheckpointError as e:\n    print(json.dumps([lazy, found, str(e)]))\n"
    )
    served = len(hub.requests)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lazy, found, missing = json.loads(run.stdout)
    assert lazy, "importing resolve_model_dir imported huggingface_hub"
    assert Path(found) == snapshot
    assert f"Hugging Face cache ({tmp_path / 'home' / 'hub'})" in missing
    assert hub.requests[served:] == []
