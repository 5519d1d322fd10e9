"""File names as the product stores them: any name a filesystem allows, as a UTF-8 string that gives back the
exact name (docs/guarantees.md).

A local name is bytes (anything but ``/`` and NUL), while Arrow, Parquet, JSON and CSV hold only UTF-8 text, so
every path the product lists, stores (``relpath`` of features, the ledger, rejects, predictions) or passes between
processes is *escaped*: its bytes are read as UTF-8, each byte that is not valid UTF-8 is written ``\\xNN`` (two
lowercase hex digits: Latin-1 ``b"chat\\xe9.jpg"`` is stored as ``chat\\xe9.jpg``), each backslash is doubled,
and nothing else changes (Unicode is never normalised: the NFC and NFD spellings of ``café.jpg`` stay two paths).
Object-store keys (``s3://``, ``gs://``) are UTF-8 already: only their backslashes are doubled.

To open a stored path's file: ``pipeline.names.os_path(relpath)`` in Python, or in bash
``ls "$(printf '%b' 'train/cats/chat\\xe9.jpg')"`` (``printf %b`` reads ``\\xNN`` and ``\\\\`` as written here).
"""

from __future__ import annotations

import os
import re

_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


def escape(name: str | bytes) -> str:
    """The stored form of a name or path: ``name`` as bytes (an OS string, surrogate-escaped as
    ``os.listdir`` returns it, or bytes) read as UTF-8, each byte that is not valid UTF-8 as
    ``\\xNN`` and each backslash doubled. Valid UTF-8; ``unescape`` gives the bytes back."""
    if isinstance(name, str):
        if "\\" not in name and name.isascii():
            return name  # the common case, without a copy
        name = os.fsencode(name)
    return name.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace")


def unescape(stored: str) -> bytes:
    """The exact bytes of the name or path that ``escape`` made ``stored`` from; a backslash that starts neither
    ``\\\\`` nor ``\\xNN`` (never written by ``escape``) is kept as it is."""
    return _ESCAPE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]),
                       stored.encode("utf-8"))


def os_path(stored: str) -> str:
    """A stored path as the string ``open``/``os.stat`` take for those bytes (surrogate-escaped
    where they are not UTF-8); a URI comes back as the UTF-8 key it names."""
    return os.fsdecode(unescape(stored))
