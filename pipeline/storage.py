"""Output locations: local folders or any pyarrow filesystem URI, written so that a
half-finished run never looks finished.

A run writes into ``<output>.partial``; only when everything is there does it move
the folder to ``<output>`` (a rename on local disks; copy-then-delete on object stores,
where the manifest, written last, is the commit marker). A ``<output>.lock`` file keeps
two runs from writing the same output at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipeline.errors import OutputError

MANIFEST = "manifest.json"


def split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and in-filesystem path of a local path, ``file://``, ``s3://``… URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    return "/".join([uri.rstrip("/"), *parts]) if "://" in uri else os.path.join(uri, *parts)


def absolute(uri: str) -> str:
    """A local path made absolute (so it still names the same folder from another working directory); URIs as they are."""
    return uri if "://" in uri else os.path.abspath(uri)


def is_local(uri: str) -> bool:
    """Whether ``uri`` names the local filesystem."""
    return "://" not in uri or uri.startswith("file://")


def exists(uri: str) -> bool:
    """Whether anything (file or folder) is at ``uri``."""
    filesystem, path = split_uri(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def delete_dir(uri: str) -> None:
    """Remove a folder and its contents, if it exists."""
    filesystem, path = split_uri(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)


def make_dir(uri: str) -> None:
    """Create a folder and its parents."""
    filesystem, path = split_uri(uri)
    filesystem.create_dir(path, recursive=True)


def write_text(uri: str, text: str) -> None:
    """Write a small text file (JSON, CSV, markdown)."""
    write_bytes(uri, text.encode("utf-8"))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file's bytes."""
    filesystem, path = split_uri(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(data)


def move_file(src: str, dst: str) -> None:
    """Move one file, replacing ``dst`` (a rename on local disks)."""
    filesystem, src_path = split_uri(src)
    _, dst_path = split_uri(dst)
    filesystem.create_dir(dst_path.rsplit("/", 1)[0], recursive=True)
    filesystem.move(src_path, dst_path)


def read_text(uri: str) -> str:
    """Read a small text file."""
    filesystem, path = split_uri(uri)
    with filesystem.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_json(uri: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(uri: str) -> Any:
    """Read a JSON file."""
    return json.loads(read_text(uri))


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write one Parquet file; on local disks under a temporary name then renamed into place."""
    filesystem, path = split_uri(uri)
    parent = path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    if isinstance(filesystem, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=filesystem)


def list_parquet(uri: str) -> list[str]:
    """The ``.parquet`` files directly in a folder, sorted (empty when it does not exist)."""
    filesystem, path = split_uri(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    return [join(uri, n) for n in names]


def read_parquet_files(uris: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """Concatenate Parquet files read with pyarrow alone (None when there are none)."""
    if not uris:
        return None
    tables = []
    for uri in uris:
        filesystem, path = split_uri(uri)
        tables.append(pq.read_table(path, filesystem=filesystem, columns=columns))
    return pa.concat_tables(tables)


def commit_dir(staging: str, final: str) -> None:
    """Move a finished staging folder to its final place, replacing what was there."""
    delete_dir(final)
    filesystem, src = split_uri(staging)
    _, dst = split_uri(final)
    if isinstance(filesystem, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        os.replace(src, dst)
        return
    # Object stores have no folder rename: copy the data files first and the
    # manifest last, so a reader that sees the manifest sees every shard.
    infos = filesystem.get_file_info(pafs.FileSelector(src, recursive=True))
    files = sorted((i.path for i in infos if i.type == pafs.FileType.File), key=lambda p: p.endswith(MANIFEST))
    for path in files:
        filesystem.copy_file(path, dst + path[len(src):])
    filesystem.delete_dir(src)


def is_complete(uri: str) -> bool:
    """Whether ``uri`` holds a finished run (its manifest, written last, is there)."""
    return exists(join(uri, MANIFEST))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(uri: str) -> Iterator[None]:
    """Hold ``<uri>.lock`` for the duration of a run; a second run refuses with a clear message.

    A lock left by a process on this host that no longer exists is stale and taken over.
    Object stores have no atomic create-if-absent, so remote outputs are not locked.
    """
    if not is_local(uri):
        yield
        return
    _, path = split_uri(uri)
    lock = path.rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(lock) as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                os.remove(lock)
                continue
            raise OutputError(
                f"{uri} is being written by another run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}); wait for it to finish, or remove {lock} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
