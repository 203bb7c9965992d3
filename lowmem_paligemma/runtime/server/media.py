"""Images as clients send them: data: URIs and base64 strings, or files under the operator's `--media-dir`.

The server makes no outbound request, so an http(s) URL is refused with a message saying how to send the image
instead. A local path (plain, or file://) is read only under the media directory: it is resolved first (symbolic
links and ".." followed) and must still lie inside it. Before anything is decoded the bytes are bounded
(`max_bytes`) and the pixels are read from the header (`max_pixels`); `decode_image` then refuses truncated,
corrupt and bomb images. Every refusal is an ImageError (HTTP 400) naming the image as the client sent it.

These functions block (decoding, hashing, file reads): the app calls them in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlparse

from PIL import Image, UnidentifiedImageError

from ...errors import ImageError
from ...model.processor import decode_image, to_rgb

SHOWN_CHARS = 60  # of a URL or base64 string quoted in an error message


@dataclass(frozen=True)
class Picture:
    image: Image.Image  # RGB, decoded: what the model sees and what boxes are measured on
    key: str  # sha256 of the bytes sent: the engine's cache key


def from_url(url: str, media_dir: Path | None, max_bytes: int, max_pixels: int) -> Picture:
    """An OpenAI `image_url`: a data: URI, or a local path / file:// URL under `media_dir`."""
    name = _shown(url)
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        return decode(_data_uri(url, name, max_bytes), name, max_pixels)
    if scheme in ("http", "https"):
        raise ImageError(
            f"{name}: the server makes no outbound requests, so it does not fetch URLs; send the image itself as "
            "a data: URI (data:image/png;base64,...)"
        )
    if scheme not in ("", "file"):
        raise ImageError(f"{name}: unsupported URL scheme {scheme!r}; send a data: URI")
    return decode(_media_file(url, scheme, media_dir, name, max_bytes), name, max_pixels)


def from_base64(data: str, name: str, max_bytes: int, max_pixels: int) -> Picture:
    """An ollama `images` entry: base64 of the image file."""
    return decode(_base64(data, name, max_bytes), name, max_pixels)


def decode(data: bytes, name: str, max_pixels: int) -> Picture:
    if not data:
        raise ImageError(f"{name}: the image is empty")
    try:  # the header alone: a bomb is refused before any pixel is decoded
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        width = height = 0  # decode_image below says what is wrong
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} is more pixels than this server takes ({max_pixels:,})")
    image = decode_image(io.BytesIO(data), name)
    try:
        rgb = to_rgb(image)
    except (OSError, ValueError) as e:  # a mode with no conversion to RGB
        raise ImageError(f"{name}: cannot read the image as RGB (mode {image.mode}: {e})") from None
    return Picture(rgb, hashlib.sha256(data).hexdigest())


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _data_uri(url: str, name: str, max_bytes: int) -> bytes:
    # data:[<media type>][;base64],<data> (RFC 2397); the media type is not trusted: the decoder reads the bytes.
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageError(f"{name}: a data: URI needs a comma before its data")
    if header.lower().endswith(";base64"):
        return _base64(payload, name, max_bytes)
    if len(payload) > 3 * max_bytes:  # percent-encoding takes at most 3 characters a byte
        raise ImageError(f"{name}: the image is over {max_bytes:,} bytes")
    data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageError(f"{name}: the image is over {max_bytes:,} bytes")
    return data


def _base64(text: str, name: str, max_bytes: int) -> bytes:
    if len(text) > (max_bytes + 2) // 3 * 4:  # before decoding: 4 characters per 3 bytes
        raise ImageError(f"{name}: the image is over {max_bytes:,} bytes")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name}: not valid base64 ({e})") from None


def _media_file(url: str, scheme: str, media_dir: Path | None, name: str, max_bytes: int) -> bytes:
    if media_dir is None:
        raise ImageError(
            f"{name}: local files are not read unless the server is started with --media-dir DIR; send a data: URI"
        )
    parsed = urlparse(url)
    if scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise ImageError(f"{name}: a file:// URL must name a local file (no host)")
    relative = unquote(parsed.path) if scheme == "file" else url
    root = media_dir.resolve()
    try:
        # An absolute path replaces the root in the join; resolve() follows ".." and symbolic links: what is
        # left must still lie under the media directory, whatever was typed.
        path = (root / relative).resolve()
        inside = path.is_relative_to(root)
        size = path.stat().st_size if inside and path.is_file() else None
    except (OSError, ValueError):  # a NUL byte, a name too long, a loop of links
        raise ImageError(f"{name}: not a readable path") from None
    if not inside:
        raise ImageError(f"{name}: outside the media directory; only files under --media-dir are read")
    if size is None:
        raise ImageError(f"{name}: no such file in the media directory")
    if size > max_bytes:
        raise ImageError(f"{name}: the image is over {max_bytes:,} bytes")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{name}: cannot read it ({e.strerror})") from None
