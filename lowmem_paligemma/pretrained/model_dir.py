"""A model named by a local directory or by a Hugging Face Hub id -> the checkpoint directory, or a CheckpointError.

What is special here:
- A local directory always wins. A path that does not exist and reads as a Hub id (`namespace/name`, optionally
  `@revision`: a branch, a tag or a full commit hash) is looked up in the local Hugging Face cache, the one
  `hf download` fills: HF_HUB_CACHE, else HF_HOME/hub, as huggingface_hub read them when it was first imported.
- Never a network call: huggingface_hub's own `snapshot_download(..., local_files_only=True)` follows
  refs/<revision> to snapshots/<commit>, and where its download left the commit's file listing
  (trees/<commit>.json) it refuses a snapshot with files missing. A snapshot without a listing (left by
  `hf download <id> config.json`, or an older huggingface_hub) is checked here: config.json and every weight file.
- huggingface_hub is imported on first use, so importing lowmem_paligemma stays cheap.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..checkpoint.safetensors_io import checkpoint_files, refuse_partial
from ..errors import CheckpointError

# The Hub's `namespace/name` (huggingface_hub validates the finer rules), then an optional `@revision`; a revision
# may hold slashes (`refs/pr/1`).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory `path` names: a local directory, or the cached snapshot of a Hub id."""
    p = Path(path)
    if p.is_dir():
        refuse_partial(p)
        return p
    if p.exists():
        raise CheckpointError(f"{p}: not a directory; pass the model directory (config.json, *.safetensors)")
    hub_id = _HUB_ID.fullmatch(os.fspath(path))
    if hub_id is None:
        raise CheckpointError(f"{p}: no such directory")
    return _cached_snapshot(os.fspath(path), hub_id["repo"], hub_id["revision"])


def _cached_snapshot(spec: str, repo: str, revision: str | None) -> Path:
    """The snapshot directory of `repo` at `revision` (None: the default branch) in the local Hugging Face cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    download = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except HFValidationError:  # `a/b--c` and the like: no Hub id after all
        raise CheckpointError(f"{spec}: no such directory") from None
    except IncompleteSnapshotError as e:  # before its base class: the listing names files the snapshot lacks
        raise CheckpointError(
            f"{spec}: the download in the Hugging Face cache is incomplete ({e.snapshot_path} lacks files its "
            f"commit lists); finish it: {download}"
        ) from None
    except LocalEntryNotFoundError:
        at = f" (revision {revision})" if revision else ""
        raise CheckpointError(
            f"{spec}: no such directory, and Hub model id {repo}{at} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); accept its license at https://huggingface.co/{repo}, log in (hf auth login), "
            f"then download it: {download}"
        ) from None
    # A snapshot without a file listing is whatever was fetched into it, file by file.
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(
            f"{spec}: the download in the Hugging Face cache is incomplete ({snapshot} has no config.json); "
            f"finish it: {download}"
        )
    try:
        checkpoint_files(snapshot)
    except CheckpointError as e:
        raise CheckpointError(
            f"{spec}: the download in the Hugging Face cache is incomplete ({e}); finish it: {download}"
        ) from None
    return snapshot
