"""TEMPORARY (replaced by the Hub-id resolver being written): the model directory, or a CheckpointError."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..checkpoint.safetensors_io import refuse_partial
from ..errors import CheckpointError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        refuse_partial(p)
        return p
    if p.exists():
        raise CheckpointError(f"{p}: not a directory; pass the model directory (config.json, *.safetensors)")
    if _HUB_ID.fullmatch(str(path)):
        raise CheckpointError(
            f"{path}: no such directory. This looks like a Hub model id; weights are read from a local directory "
            f"only. Download them first (after accepting the license on the Hub): "
            f"huggingface-cli download {path} --local-dir {p.name}, then pass {p.name}"
        )
    raise CheckpointError(f"{p}: no such directory")
