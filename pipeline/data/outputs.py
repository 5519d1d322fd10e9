"""Which output folders a job may write into and replace: only its own earlier outputs.

A job describes what it writes with a ``Layout``: its ``markers`` (files only it writes there,
first), glob patterns of every file it may write, and the folders that hold another job's output.
A folder is usable when it is missing or holds no file, or when it holds a marker and nothing but
the layout's files (their ``.tmp-<pid>`` copies included). Anything else (a user's photos or notes,
an unknown folder, hidden files, even beside a real earlier output) is refused with an
``OutputError`` naming a few of them, with or without ``--overwrite``, and nothing is deleted.
Paths recorded inside an output are trusted only after ``require_inside`` has checked them.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import functools
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from pyarrow import fs as pafs

from pipeline import names
from pipeline.data import locks, storage
from pipeline.errors import OutputError

# storage writes a file as ``<name>.tmp-<pid>[-<thread>]`` and renames it; a killed run leaves it.
_TEMPORARY = re.compile(r"\.tmp-\d+(-\d+)?$")
_SHOWN = 5
# The output locks a running job holds (``holding_locks``), taken once it knows its folder.
_HELD: contextvars.ContextVar[contextlib.ExitStack] = contextvars.ContextVar("held_output_locks")
J = TypeVar("J", bound=Callable[..., Any])


@dataclass(frozen=True)
class Layout:
    """What one job writes in its output folder: ``what`` it is ("an extraction"), ``markers`` (any
    one of them says this project wrote the folder), ``files`` (fnmatch patterns of '/'-separated
    relative paths; ``*`` also spans folders) and ``folders`` (sub-folder name → its own layout)."""

    what: str
    markers: tuple[str, ...]
    files: tuple[str, ...]
    folders: Mapping[str, "Layout"] = field(default_factory=dict)

    def allows_file(self, name: str) -> bool:
        """Whether this job may have written the file ``name`` (relative, outside ``folders``)."""
        name = _TEMPORARY.sub("", name)
        return any(fnmatch.fnmatchcase(name, p) for p in self.markers + self.files)

    def allows_dir(self, name: str) -> bool:
        """Whether the folder ``name`` may hold this job's files (or is one of ``folders``)."""
        prefixes = {"/".join(p.split("/")[:k]) for p in self.files for k in range(1, p.count("/") + 1)}
        return name in self.folders or any(fnmatch.fnmatchcase(name, p) for p in prefixes | set(self.files))


def _listing(uri: str) -> tuple[list[str], list[str], list[str]]:
    """(files, folders, links) under ``uri`` relative to it, hidden ones included; empty when it is missing."""
    filesystem, base = storage.split_uri(uri)
    if filesystem.get_file_info(base).type != pafs.FileType.Directory:
        return [], [], []
    if isinstance(filesystem, pafs.LocalFileSystem):
        return _local_listing(base)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    cut = len(base.rstrip("/")) + 1
    files = sorted(i.path[cut:] for i in infos if i.type != pafs.FileType.Directory)
    folders = sorted(i.path[cut:] for i in infos if i.type == pafs.FileType.Directory)
    return files, folders, []


def _local_listing(base: str) -> tuple[list[str], list[str], list[str]]:
    """``_listing`` of a local folder, links not followed: the project never writes a link, so a
    link (to a folder or a file) is listed as a file and as a link, which is refused even under a
    layout's name; a deletion can then never reach through one. Names that are not UTF-8 are listed
    escaped (``pipeline.names``)."""
    files, folders, links = [], [], []
    for top, dirs, names_here in os.walk(base, followlinks=False):
        rel = os.path.relpath(top, base)
        prefix = "" if rel == "." else names.escape(rel) + "/"
        for d in list(dirs):
            if os.path.islink(os.path.join(top, d)):
                dirs.remove(d)
                names_here.append(d)
            else:
                folders.append(prefix + names.escape(d))
        files += [prefix + names.escape(n) for n in names_here]
        links += [prefix + names.escape(n) for n in names_here if os.path.islink(os.path.join(top, n))]
    return sorted(files), sorted(folders), sorted(links)


def _judge(files: list[str], folders: list[str], layout: Layout) -> tuple[list[str], bool]:
    """(the entries this project would not have written under ``layout``, whether a marker is there); a
    sub-folder of ``layout.folders`` is judged by its own layout, and all its files named if it has no marker."""
    foreign, inner = [], {}
    for name in files + [f"{d}/" for d in folders]:
        head, _, rest = name.partition("/")
        if head in layout.folders and rest:
            inner.setdefault(head, ([], []))[name.endswith("/")].append(rest.rstrip("/"))
        elif not (layout.allows_dir(name[:-1]) if name.endswith("/") else layout.allows_file(name)):
            foreign.append(name)
    marked = any(name in layout.markers for name in files)
    for head, (sub_files, sub_folders) in inner.items():
        sub_foreign, sub_marked = _judge(sub_files, sub_folders, layout.folders[head])
        if sub_files and not sub_marked:
            sub_foreign = sorted(set(sub_foreign) | set(sub_files))
        foreign += [f"{head}/{n}" for n in sub_foreign]
        marked = marked or (sub_marked and not sub_foreign)
    return sorted(foreign), marked


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return f"{shown} and {len(names) - _SHOWN} more ({len(names)} in all)" if len(names) > _SHOWN else shown


def check(uri: str, layout: Layout) -> bool:
    """Refuse (OutputError) an output folder holding anything ``layout`` does not name, or files but none of its
    markers; return whether it holds an earlier output of this job (False: missing, or holding no file)."""
    return bool(_checked(uri, layout))


def prepare(uri: str, layout: Layout, overwrite: bool) -> None:
    """``check`` the output folder; with ``overwrite`` then delete the earlier output it holds:
    its files one by one, the markers last (an interrupted overwrite still leaves a folder
    recognised as this project's), then the folder."""
    files = _checked(uri, layout)
    if not (files and overwrite):
        return
    markers = _all_markers(layout)
    for name in sorted(files, key=lambda f: posixpath.basename(f) in markers):
        storage.delete_file(storage.join(uri, name))
    storage.delete_dir(uri)


def _checked(uri: str, layout: Layout) -> list[str]:
    """The files in ``uri``, after refusing a folder that holds anything ``layout`` does not allow."""
    files, folders, links = _listing(uri)
    foreign, marked = _judge(files, folders, layout)
    foreign += [f for f in links if f not in foreign]
    if foreign:
        raise OutputError(f"{uri} holds files that are not {layout.what} of this project: {_named(foreign)}; "
                          f"nothing was deleted. Choose another output folder (or move those files away)")
    if files and not marked:
        raise OutputError(f"{uri} holds files ({_named(files)}) but none of {', '.join(layout.markers)}, which "
                          f"{layout.what} of this project writes first; nothing was deleted. Choose another "
                          f"output folder (or delete it yourself)")
    return files


def _all_markers(layout: Layout) -> set[str]:
    return set(layout.markers).union(*(_all_markers(sub) for sub in layout.folders.values()))


def require_inside(root: str, location: str, source: str) -> str:
    """``location`` (a path or URI) normalised, after checking that it lies under the folder
    ``root``; OutputError naming ``source`` (the entry it was read from) when it does not."""
    if storage.is_uri(location):
        scheme, rest = location.split("://", 1)
        normal, base = f"{scheme}://{posixpath.normpath(rest)}", root.rstrip("/")
    else:
        normal, base = posixpath.normpath(storage.absolute(location)), posixpath.normpath(storage.absolute(root))
    if storage.is_uri(root) != storage.is_uri(location) or not normal.startswith(base + "/"):
        raise OutputError(f"{source} names {location!r}, which is not under the output {root}; not using it")
    return normal


def holding_locks(job: J) -> J:
    """Run ``job`` so that the locks it takes with ``hold_lock`` are held until it returns or fails."""
    @functools.wraps(job)
    def run(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _HELD.set(stack)
            try:
                return job(*args, **kwargs)
            finally:
                _HELD.reset(token)
    return run  # type: ignore[return-value]


def hold_lock(uri: str) -> None:
    """Take ``locks.output_lock(uri)`` for the rest of the running ``holding_locks`` job (OutputError
    when another run holds it): jobs that learn their output folder midway need no re-indented body."""
    _HELD.get().enter_context(locks.output_lock(uri))
