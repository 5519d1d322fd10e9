"""What a ``POST /predict`` body holds: the images' bytes, or the 4xx answer that refuses it. A plain
function of (body, Content-Type, limit), so every malformed body can be tried without a server; images
are counted before any is base64-decoded, and decoded as images by the replica, off its event loop.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from pipeline.errors import UserError

JSON_TYPES = ("application/json",)
# curl's --data-binary sends application/x-www-form-urlencoded unless told otherwise, and the
# README's example relies on it; a client that sends no type at all means raw bytes too.
RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded", "")
ACCEPTED = "image/*, application/octet-stream or application/json"


class RequestError(UserError):
    """A request refused with an HTTP status and a short reason (``error``) plus what was wrong (``detail``)."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """What one request may hold: body bytes, images in a JSON list, pixels per image."""

    max_upload_bytes: int
    max_images: int
    max_pixels: int


@dataclass(frozen=True)
class Images:
    """The images of one request: ``batch`` is True for the JSON form (answered as a list)."""

    images: list[bytes]
    batch: bool


def parse_body(body: bytes, content_type: str, max_images: int) -> Images:
    """The images of a request body, or ``RequestError`` saying why it is refused. Raw bytes (``image/*``,
    octet-stream, curl's default type or none) are one image; ``application/json`` must be
    ``{"images": [<base64>, ...]}`` with at most ``max_images`` (413 beyond); any other type: 415."""
    kind = content_type.split(";", 1)[0].strip().lower()  # the media type, without ``; charset=…``
    if kind in JSON_TYPES:
        return Images(_json_images(body, max_images), batch=True)
    if kind in RAW_TYPES or kind.startswith("image/"):
        # An empty raw body reaches the decoder, which calls it an "empty file" as batch prediction does.
        return Images([body], batch=False)
    raise RequestError(415, "unsupported media type", f"Content-Type {content_type[:100]!r}; send {ACCEPTED}")


def _json_images(body: bytes, max_images: int) -> list[bytes]:
    """The decoded base64 entries of ``{"images": [...]}``, counted before any is decoded."""
    if not body.strip():
        raise RequestError(400, "empty body", 'expected {"images": [<base64>, ...]}')
    try:
        document = json.loads(body)
    except RecursionError:
        raise RequestError(400, "invalid json", "nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are no text
        raise RequestError(400, "invalid json", str(exc)[:200]) from None
    items = document.get("images") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise RequestError(400, "bad request", 'expected {"images": [<base64>, ...]}')
    if len(items) > max_images:
        raise RequestError(413, "too many images",
                           f"{len(items)} images; the limit is {max_images} (--max-images-per-request)")
    images = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise RequestError(400, "bad request", f"images[{index}] is a {type(item).__name__}, not a base64 string")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:  # ValueError: a non-ASCII character in the string
            raise RequestError(400, "bad base64", f"images[{index}]: {exc}") from None
    return images
