"""One run at a time per output: ``<output>.lock``, an ``fcntl`` lock on local disks and a lease
with a heartbeat on object stores."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from pipeline.data import storage
from pipeline.errors import OutputError

# A remote lock whose holder has not renewed it for this long is stale and taken over.
LOCK_LEASE_S = 120.0
LOCK_HEARTBEAT_S = 30.0


@contextlib.contextmanager
def output_lock(uri: str) -> Iterator[None]:
    """Hold ``<uri>.lock`` for the duration of a run; a second run refuses with a clear message. Locally an
    ``fcntl.flock``, which the kernel releases when its holder dies; on object stores a lease (``_remote_lock``)."""
    lock = uri.rstrip("/") + ".lock"
    if not storage.is_local(uri):
        with _remote_lock(lock, uri):
            yield
        return
    _, path = storage.split_uri(lock)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    f = _flock(path, uri)
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_me()))
        f.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        f.close()  # closing releases the flock


def _flock(path: str, uri: str):
    """The lock file at ``path``, opened and exclusively flocked; OutputError if another process holds it."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _parse_holder(f.read())
            f.close()
            raise OutputError(f"{uri} is being written by another run (pid {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')}); wait for it to finish") from None
        # The holder we waited on may have removed the file between our open and our lock:
        # only a lock on the file that is still at ``path`` counts.
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "owner": uuid.uuid4().hex, "heartbeat": time.time()}


def _holder_is_gone(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder ran on this host and its process no longer exists (a killed run:
    its lease need not lapse before a rerun here takes over)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _parse_holder(text: str) -> dict[str, Any]:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def _remote_lock(lock: str, uri: str) -> Iterator[None]:
    """A lease on an object store: the lock object names its owner and a heartbeat that a thread renews every
    ``LOCK_HEARTBEAT_S``; one not renewed for ``LOCK_LEASE_S`` is stale. Not atomic (object stores offer pyarrow
    no create-if-absent): the lock is written, read back, and kept only if still its own, so two runs starting at
    the same moment can both pass; one starting while another holds a live lease is refused."""
    if storage.exists(lock):
        holder = _parse_holder(storage.read_text(lock))
        age = time.time() - float(holder.get("heartbeat", 0))
        if age < LOCK_LEASE_S and not _holder_is_gone(holder):
            raise OutputError(f"{uri} is being written by another run (pid {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')}, last heartbeat {age:.0f}s ago); wait for it, or for its "
                              f"lease to lapse ({LOCK_LEASE_S:.0f}s without a heartbeat) if that run is gone")
    me = _me()
    storage.write_json(lock, me)
    if _parse_holder(storage.read_text(lock)).get("owner") != me["owner"]:
        raise OutputError(f"{uri} was just locked by another run; wait for it to finish")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                storage.write_json(lock, {**me, "heartbeat": time.time()})

    thread = threading.Thread(target=renew, name="output-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError, ValueError):
            if _parse_holder(storage.read_text(lock)).get("owner") == me["owner"]:
                storage.delete_file(lock)
