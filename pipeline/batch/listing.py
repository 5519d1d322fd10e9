"""Listing in a task on the driver's node, so that a job's list of files lives once, in Ray's object store.

The driver then reads the listing's Arrow columns where they lie (zero-copy), the decode tasks take their blocks
from the same object, and the memory that listing churns through (a million paths and stamps made and dropped as
Python strings, which left the interpreter's arenas fragmented: 174 MiB of the driver's own at a million files
for a 78 MiB table) is the task's, returned when it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import pyarrow as pa
import ray

from pipeline.batch.cluster import pin_to_this_node
from pipeline.data.discover import DatasetIndex, discover_with


def listed_on_this_node(lister: Callable[..., tuple[pa.Table, Any]], *args: Any) -> tuple[pa.Table, ray.ObjectRef, Any]:
    """Run ``lister(*args)``, which returns (a table of files, anything else), in a task on this node (where a
    local root is, with this node's environment for a URI); return the table, read from the object store, that
    object's ref (``pipeline.batch.inference.decoded_images`` takes it instead of putting the files there again)
    and the rest."""
    # No CPU asked: listing comes before any other work of the job and must not wait behind a busy cluster.
    files, rest = ray.remote(lister).options(num_cpus=0, num_returns=2, **pin_to_this_node(".")).remote(*args)
    try:
        other = ray.get(rest)
    except ray.exceptions.RayTaskError as exc:
        # The files' ref holds the same error, which Ray would log with its traceback when the ref goes unread.
        with contextlib.suppress(ray.exceptions.RayTaskError):
            ray.get(files)
        raise exc.cause from None  # the listing's own error (a DataError naming the root), not Ray's wrapping of it
    return ray.get(files), files, other


def _index_listing(root: str, options: Any) -> tuple[pa.Table, DatasetIndex]:
    index = discover_with(root, options)
    return index.files, dataclasses.replace(index, files=index.files.schema.empty_table())


def discover_on_this_node(root: str, options: Any) -> tuple[DatasetIndex, ray.ObjectRef]:
    """``discover_with(root, options)`` listed by ``listed_on_this_node``: the index and its files' ref."""
    files, ref, index = listed_on_this_node(_index_listing, root, options)
    return dataclasses.replace(index, files=files), ref
