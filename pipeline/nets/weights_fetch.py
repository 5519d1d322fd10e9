"""Fetch one pinned source archive from the package indexes pip is configured with, verified
before anything reads it.

Not ``pip download``: for a source archive pip prepares the package's metadata, which runs the
archive's build backend on this machine (``--require-hashes`` only moves the hash check in front of
that), and no pip option fetches without preparing. So this module only asks pip where to look
(``pip config list``: ``index-url``, ``extra-index-url``, ``find-links``, ``no-index``, ``cert``,
``timeout`` from its files and ``PIP_*`` variables), finds the archive's link itself (a
``find-links`` folder or page, or the index's PEP 503 page of the project), downloads the bytes and
checks their sha256: another hash is deleted unread. Nothing from the archive runs.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import html.parser
import os
import re
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from typing import Iterator

from pipeline.errors import WeightsError
from pipeline.redact import redact

DEFAULT_INDEX = "https://pypi.org/simple"
# Where pip's settings for `pip download` come from, strongest first.
_SECTIONS = (":env:", "download", "global")
_CONFIG_LINE = re.compile(r"^(?P<section>:env:|[\w-]+)\.(?P<key>[\w-]+)=(?P<value>.*)$")


def pip_settings() -> dict[str, str]:
    """pip's effective settings for ``pip download`` (``{key: value}``; empty when pip is absent)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found: dict[tuple[str, str], str] = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        match = _CONFIG_LINE.match(line.strip())
        if match and match["section"] in _SECTIONS:
            found[match["section"], match["key"]] = ast.literal_eval(match["value"])
    keys = {key for _, key in found}
    return {key: next(found[s, key] for s in _SECTIONS if (s, key) in found) for key in keys}


def _locations(settings: dict[str, str], project: str) -> tuple[list[str], list[str]]:
    """The find-links entries and the project's index pages, in the order pip would try them."""
    links = settings.get("find-links", "").split()
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        return links, []
    indexes = [settings.get("index-url") or DEFAULT_INDEX, *settings.get("extra-index-url", "").split()]
    return links, [f"{index.rstrip('/')}/{project}/" for index in indexes]


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [value for name, value in attrs if name == "href" and value]


def _open(url: str, settings: dict[str, str]):
    """A readable response for a local path, ``file://`` or ``http(s)://`` URL (credentials in
    the URL become a Basic authorization header, as pip sends them)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("", "file"):
        path = urllib.request.url2pathname(parts.path) if parts.scheme else url
        return open(os.path.join(path, "index.html") if os.path.isdir(path) else path, "rb")
    request = urllib.request.Request(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl())
    if parts.username:
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    context = ssl.create_default_context(cafile=settings.get("cert") or None)
    timeout = float(settings.get("timeout") or settings.get("default-timeout") or 60)
    return urllib.request.urlopen(request, timeout=timeout, context=context)


def _candidates(names: set[str], settings: dict[str, str], project: str, errors: list[str]) -> Iterator[str]:
    """URLs or paths of files called one of ``names``: find-links first, then the indexes."""
    links, pages = _locations(settings, project)
    for entry in links:
        folder = urllib.request.url2pathname(entry[7:]) if entry.startswith("file://") else entry
        if os.path.isdir(folder):
            yield from (os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.lower() in names)
        else:
            pages.insert(0, entry)
    for page in pages:
        try:
            with _open(page, settings) as response:
                parser = _Links()
                parser.feed(response.read().decode("utf-8", errors="replace"))
        except (OSError, ValueError) as exc:  # urllib's HTTPError and URLError are OSErrors
            # An index without the project answers 404 (a local one: no such folder).
            if not isinstance(exc, FileNotFoundError) and getattr(exc, "code", None) != 404:
                errors.append(f"{redact(page)}: {redact(str(exc))}")
            continue
        for href in parser.hrefs:
            url = urllib.parse.urljoin(page, href).split("#", 1)[0]
            if urllib.parse.unquote(url.rsplit("/", 1)[-1]).lower() in names:
                yield url


def fetch_verified(names: set[str], project: str, sha256: str, max_bytes: int, target: str) -> None:
    """Download the first file called one of ``names`` whose sha256 is ``sha256`` to ``target``: each candidate is
    hashed as it streams into a temporary file beside ``target``, deleted unread unless its hash is the pinned one.
    WeightsError, naming each refusal, when none verifies."""
    settings = pip_settings()
    errors: list[str] = []
    for source in _candidates({n.lower() for n in names}, settings, project, errors):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, _open(source, settings) as response:
                actual = _copy_hashing(response, out, max_bytes)
            if actual == sha256:
                os.replace(tmp, target)
                return
            errors.append(f"sha256 of {redact(source)} is {actual}, expected {sha256}: not the pinned release, "
                          f"refused without opening it")
        except (OSError, ValueError) as exc:
            errors.append(f"{redact(source)}: {redact(str(exc))}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise WeightsError(f"no verified {' or '.join(sorted(names))} on pip's indexes "
                       f"({'; '.join(errors) or 'not found'})")


def _copy_hashing(source, out, max_bytes: int) -> str:
    """Copy ``source`` to ``out`` in chunks; its sha256, or ValueError past ``max_bytes``."""
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: source.read(1 << 20), b""):
        size += len(chunk)
        if size > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes, more than the pinned archive")
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest()
