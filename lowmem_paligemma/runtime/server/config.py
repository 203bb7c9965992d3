"""What the operator decides about a server: `ServerConfig`, validated when made (OptionError naming the field), as
LoadOptions and SamplingOptions are, so the CLI and a library caller get the same checks.

Imports nothing of the HTTP stack: the CLI reads its defaults without the `serve` extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import OptionError
from ...units import parse_size

MAX_BODY_BYTES = 20 * 10**6  # a request body: a few photos as base64 fit; 100 MB of JSON does not
# Pixels an image may have before it is decoded (a 7000x5000 photo); PaliGemma sees at most 896x896, so more is
# only memory. PIL's own bomb check (decode_image) is the second line.
MAX_IMAGE_PIXELS = 40 * 10**6


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  # clients send `Authorization: Bearer KEY`; None: no key asked (the 127.0.0.1 default)
    media_dir: Path | None = None  # local image paths are read only under this directory; None: no local paths
    vae: Path | None = None  # big_vision's vae-oid.npz: segmentation masks in the responses
    max_body: int = MAX_BODY_BYTES  # bytes of a request body (413 above), images included
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width x height of one image, read from its header (400 above)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise OptionError("api_key must be a non-empty string (or None for no key)", "api_key")
        for name in ("media_dir", "vae"):
            if isinstance(getattr(self, name), str):
                set_(name, Path(getattr(self, name)))
        if self.media_dir is not None and not self.media_dir.is_dir():
            raise OptionError(f"{self.media_dir}: no such directory", "media_dir")
        if self.vae is not None and not self.vae.is_file():
            raise OptionError(f"{self.vae}: no such file", "vae")
        if isinstance(self.max_body, str):
            try:
                set_("max_body", parse_size(self.max_body))
            except ValueError as e:
                raise OptionError(str(e), "max_body") from None
        for name in ("max_body", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
                raise OptionError(f"{name} must be an integer >= 1024, got {value!r}", name)
