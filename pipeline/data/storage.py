"""Where data lives: local folders or any pyarrow filesystem URI (``s3://``, ``gs://``, ``file://``),
read and written so that a half-finished run never looks finished.

Every input and output goes through this module, so a job works on buckets with the same code as on
a laptop (credentials and endpoints come from the usual ``AWS_*``/``GOOGLE_*`` variables, which
pyarrow reads). Every single object is written whole (``_write_whole``); outputs are committed piece
by piece (``pipeline.data.ledger``), a manifest written last marks a finished one, and
``<output>.lock`` (``pipeline.data.locks``) keeps two runs from writing one output at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipeline import names
from pipeline.data.localtree import LocalTree
from pipeline.redact import redact_values

MANIFEST = "manifest.json"
# Files read at once when many small ones are read together.
READ_THREADS = 16


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (``scheme://…``) rather than a plain local path."""
    return "://" in location


def is_local(uri: str) -> bool:
    """Whether ``uri`` names the local filesystem."""
    return not is_uri(uri) or uri.startswith("file://")


@functools.lru_cache(maxsize=32)
def _filesystem(prefix: str, endpoint: str | None) -> pafs.FileSystem:
    # One filesystem object per bucket (and endpoint) and process: building one resolves
    # credentials and the region, far too slow to repeat for every file a decode task reads.
    return pafs.FileSystem.from_uri(prefix)[0]


def split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and in-filesystem path of a local path, ``file://``, ``s3://``… URI."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(rest)
    if scheme in ("s3", "gs", "gcs"):
        bucket = rest.split("/", 1)[0]
        return _filesystem(f"{scheme}://{bucket}", os.environ.get("AWS_ENDPOINT_URL")), rest.rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    return "/".join([uri.rstrip("/"), *parts]) if is_uri(uri) else os.path.join(uri, *parts)


def parent(uri: str) -> str:
    """The folder that holds ``uri``."""
    return uri.rstrip("/").rsplit("/", 1)[0] if is_uri(uri) else os.path.dirname(os.path.abspath(uri))


def basename(uri: str) -> str:
    """The last component of a path or URI (``s3://b/photos/`` → ``photos``)."""
    return uri.rstrip("/").rsplit("/", 1)[-1] if is_uri(uri) else os.path.basename(os.path.normpath(uri))


def relative(uri: str, root: str) -> str:
    """``uri`` relative to the folder ``root`` (both local paths, or both URIs)."""
    if is_uri(uri):
        return uri[len(root.rstrip("/")) + 1:] if uri.startswith(root.rstrip("/") + "/") else uri
    return os.path.relpath(uri, root)


def absolute(uri: str) -> str:
    """A local path made absolute (the same folder from another working directory); URIs as they are."""
    return uri if is_uri(uri) else os.path.abspath(uri)


def describe_problem(uri: str, want: str = "folder") -> str | None:
    """Why ``uri`` cannot be read as a ``want`` ("folder" or "file"), or None when it can: a missing bucket or
    path, the wrong kind of entry, or a store that refuses the request, so the message says what to fix."""
    try:
        filesystem, path = split_uri(uri)
        info = filesystem.get_file_info(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return f"it cannot be read: {exc} (check the credentials and endpoint in AWS_*/GOOGLE_* variables)"
    if info.type == pafs.FileType.NotFound:
        return describe_output_problem(uri) or "it does not exist"
    if want == "folder" and info.type != pafs.FileType.Directory:
        return "it is a file, not a folder"
    if want == "file" and info.type != pafs.FileType.File:
        return "it is a folder, not a file"
    return None


def describe_output_problem(uri: str) -> str | None:
    """Why nothing can be written under ``uri`` (a missing bucket, an unreachable store), or None."""
    if is_local(uri):
        return None
    try:
        filesystem, path = split_uri(uri)
        bucket = path.split("/", 1)[0]
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"its bucket {bucket!r} does not exist (or these credentials cannot see it)"
    except (OSError, ValueError, pa.ArrowException) as exc:
        return f"the store refused or did not answer: {exc} (check the credentials and endpoint in AWS_*/GOOGLE_* " \
               "variables)"
    return None


def exists(uri: str) -> bool:
    """Whether anything (file or folder) is at ``uri``."""
    filesystem, path = split_uri(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    """Whether ``uri`` is a file."""
    filesystem, path = split_uri(uri)
    return filesystem.get_file_info(path).type == pafs.FileType.File


def delete_dir(uri: str) -> None:
    """Remove a folder and its contents, if it exists."""
    filesystem, path = split_uri(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)


def delete_file(uri: str) -> None:
    """Remove one file, if it exists."""
    filesystem, path = split_uri(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        filesystem.delete_file(path)


def walk_files(root: str, tree: LocalTree | None = None) -> Iterator[tuple[str, str]]:
    """``(stored path relative to root, stamp)`` of every file under ``root``, recursively, sorted, hidden ones
    skipped; ``stamp`` is ``size:mtime_ns`` (``missing`` for a broken link). Streams folder by folder (a million
    objects: one folder's names held at a time); local links are followed as ``pipeline.data.localtree`` says, and
    ``tree`` is the data root's listing state when ``root`` is one folder of it (``local_tree``)."""
    filesystem, base = split_uri(root)
    if isinstance(filesystem, pafs.LocalFileSystem):
        yield from (tree or LocalTree(base)).walk(base)
        return
    yield from ((names.escape(rel), stamp) for rel, stamp in _walk_remote(filesystem, base, len(base) + 1))


def local_tree(root: str) -> LocalTree | None:
    """The listing state shared by the walks of several folders of one data root (None when the
    root is not local)."""
    filesystem, base = split_uri(root)
    return LocalTree(base) if isinstance(filesystem, pafs.LocalFileSystem) else None


def _walk_remote(filesystem: pafs.FileSystem, folder: str, cut: int) -> Iterator[tuple[str, str]]:
    infos = filesystem.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
    files = sorted((i.path, f"{i.size}:{i.mtime_ns}") for i in infos
                   if i.type == pafs.FileType.File and not i.base_name.startswith("."))
    folders = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))
    del infos
    for path, stamp in files:
        yield path[cut:], stamp
    for sub in folders:
        yield from _walk_remote(filesystem, sub, cut)


def list_dirs(uri: str) -> list[str]:
    """Stored names (``pipeline.names``) of the (non-hidden) folders directly in ``uri``, sorted."""
    filesystem, path = split_uri(uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        # os.scandir, not pyarrow: pyarrow cannot list a name that is not UTF-8.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(path) as entries:
            return sorted(names.escape(e.name) for e in entries if e.is_dir() and not e.name.startswith("."))
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(names.escape(i.base_name) for i in infos
                  if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))


def write_text(uri: str, text: str) -> None:
    """Write a small text file (JSON, CSV, markdown)."""
    write_bytes(uri, text.encode("utf-8"))


def _write_whole(uri: str, write: Callable[[pafs.FileSystem, str], None]) -> None:
    """Make the file ``uri`` with ``write(filesystem, path)`` so that it appears whole: in one PUT on object
    stores, on local disks under a temporary name (``outputs`` knows its form) then renamed into place."""
    filesystem, path = split_uri(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if not isinstance(filesystem, pafs.LocalFileSystem):
        write(filesystem, path)
        return
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    write(filesystem, tmp)
    os.replace(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file's bytes, whole."""

    def write(filesystem: pafs.FileSystem, path: str) -> None:
        local = isinstance(filesystem, pafs.LocalFileSystem)
        with open(path, "wb") if local else filesystem.open_output_stream(path) as f:
            f.write(data)

    _write_whole(uri, write)


class FileTooLarge(ValueError):
    """A file larger than a reader's limit: it was not read."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"{size} bytes; the limit is {limit}")
        self.size, self.limit = size, limit


class NotARegularFile(OSError):
    """A local path that is a FIFO, socket or device: reading it could block for ever."""


def _open_regular(path: str):
    """A local file opened for reading; NotARegularFile for anything else (opened without
    blocking, so that a FIFO under a photo's name cannot hang its reader)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        if stat.S_ISDIR(kind):
            raise IsADirectoryError(errno.EISDIR, "is a folder")
        raise NotARegularFile(errno.EINVAL, "not a regular file (a FIFO, socket or device)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The bytes of a file; with ``limit``, a larger file raises FileTooLarge before it is read
    (its size is asked first, and a file growing meanwhile is cut off at ``limit + 1`` bytes)."""
    filesystem, path = split_uri(uri)
    opened = _open_regular(path) if isinstance(filesystem, pafs.LocalFileSystem) else filesystem.open_input_file(path)
    with opened as f:
        if limit is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size if isinstance(f, io.BufferedReader) else f.size()
        data = f.read(limit + 1) if size <= limit else b""
        if size > limit or len(data) > limit:
            raise FileTooLarge(max(size, len(data)), limit)
        return data


def read_text(uri: str) -> str:
    """Read a small text file."""
    return read_bytes(uri).decode("utf-8")


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to ``uri``, whole."""
    _write_whole(uri, lambda filesystem, path: pafs.copy_files(
        local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem))


def upload_dir(local_dir: str, uri: str) -> None:
    """Replace the folder at ``uri`` with a copy of the local folder ``local_dir``."""
    delete_dir(uri)
    filesystem, path = split_uri(uri)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)


@contextlib.contextmanager
def local_copy(uri: str, suffix: str = "", name: str | None = None) -> Iterator[str]:
    """A local path holding the file at ``uri``: the file itself when local, else a temporary
    download named ``name`` (by default ``file`` + ``suffix``)."""
    if is_local(uri):
        yield split_uri(uri)[1]
        return
    with tempfile.TemporaryDirectory(prefix="ric-") as tmp:
        path = os.path.join(tmp, name or "file" + suffix)
        with open(path, "wb") as f:
            f.write(read_bytes(uri))
        yield path


def write_json(uri: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, credentials in any URI it holds redacted (``pipeline.redact``)."""
    write_text(uri, json.dumps(redact_values(obj), indent=2, sort_keys=False) + "\n")


def read_json(uri: str) -> Any:
    """Read a JSON file."""
    return json.loads(read_text(uri))


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write one Parquet file, whole."""
    _write_whole(uri, lambda filesystem, path: pq.write_table(table, path, filesystem=filesystem))


def write_csv(uri: str, table: pa.Table) -> None:
    """Write one CSV file (with a header row), whole."""

    def write(filesystem: pafs.FileSystem, path: str) -> None:
        with filesystem.open_output_stream(path) as f:
            pacsv.write_csv(table, f)

    _write_whole(uri, write)


def list_parquet(uri: str) -> list[str]:
    """The ``.parquet`` files directly in a folder, sorted (empty when it does not exist)."""
    filesystem, path = split_uri(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    return [join(uri, n) for n in names]


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, read with pyarrow alone."""
    filesystem, path = split_uri(uri)
    return pq.read_table(path, filesystem=filesystem, columns=columns)


def read_parquet_files(uris: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """Concatenate Parquet files read with pyarrow alone (None when there are none)."""
    if not uris:
        return None
    # Many small shards on an object store: one request at a time would take minutes.
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return pa.concat_tables(pool.map(lambda uri: read_parquet(uri, columns), uris))


def cache_dir() -> str:
    """The user's cache folder for this project (``RIC_CACHE_DIR`` overrides it)."""
    root = os.environ.get("RIC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ray-image-classifier"
    )
    os.makedirs(root, exist_ok=True)
    return root
