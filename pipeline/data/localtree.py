"""Listing the files of a local data root so that each real file is one row, whatever links,
loops and names the folder holds (``LocalTree.walk``):

- a folder symlink is followed only when it leads outside the data root, never back inside it or to
  a folder that holds it (that tree is walked under its own path, keeping its split and class, and a
  link such as ``train/dogs/loop -> ..`` cannot make the walk go round);
- each real folder is walked once, and a file reached by two paths is listed once: a file symlink
  into the root is left to its target's own path, hard links or several links to one outside file
  are listed at the first path in sorted order (device and inode are kept only for folders and such
  files, so memory stays small at a million files);
- a broken symlink is listed (decoding records it as the reject ``missing``);
- names are listed in their stored form (``pipeline.names.escape``), sorted, hidden ones skipped.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Iterator

from pipeline import names

log = logging.getLogger(__name__)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class LocalTree:
    """The listing state of one local data root: the folders and multiply-reachable files
    already listed, shared by every ``walk`` of folders under it (so a file hard-linked into
    two class folders is one row)."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.given = os.path.abspath(root)
        self._folders: set[tuple[int, int]] = set()
        self._files: set[tuple[int, int]] = set()
        self._reported: set[str] = set()

    def walk(self, folder: str) -> Iterator[tuple[str, str]]:
        """``(stored path relative to folder, stamp)`` of every file under ``folder`` (a local
        path inside the root), depth first and sorted as ``os.walk`` goes; ``stamp`` is
        ``size:mtime_ns``, ``missing`` for a broken link."""
        try:
            st = os.stat(folder)
        except OSError:
            return
        if (os.path.islink(folder) and os.path.abspath(folder) != self.given
                and _within(os.path.realpath(folder), self.root)):
            # A split or class folder that is a link into the root (validation/cats -> ../train/cats).
            self._report(folder, "is a link inside the data root; not followed (its files are listed under "
                                 "their own path)")
            return
        if (st.st_dev, st.st_ino) in self._folders:
            self._report(folder, "is a folder already listed; not listed again")
            return
        self._folders.add((st.st_dev, st.st_ino))
        yield from self._walk(folder)

    def _walk(self, top: str) -> Iterator[tuple[str, str]]:
        # Depth first with a stack of its own (a recursion would end at Python's limit, about a
        # thousand nested folders); a folder is judged by ``_enter`` when its turn comes, so the
        # first path in sorted order is the one a twice-reached folder is listed under.
        stack: list[tuple[os.DirEntry | None, str, str]] = [(None, top, "")]
        while stack:
            entry, path, prefix = stack.pop()
            if entry is not None and not self._enter(entry):
                continue
            try:
                # Only the names of files are kept while a folder is sorted: a DirEntry with its
                # cached stat is about 0.5 kB, which made a folder of 400,000 files cost 200 MB.
                files, folders = [], []
                with os.scandir(path) as entries:
                    for item in entries:
                        if item.name.startswith("."):
                            continue
                        if item.is_dir():
                            folders.append(item)
                        else:
                            files.append((item.name, item.is_symlink()))
            except OSError as exc:
                self._report(path, f"cannot be listed ({exc.strerror}); its files are left out")
                continue
            files.sort()
            for name, is_link in files:
                stamp = self._file_stamp(os.path.join(path, name), is_link)
                if stamp is not None:
                    yield prefix + names.escape(name), stamp
            folders.sort(key=lambda e: e.name)
            stack += [(f, f.path, prefix + names.escape(f.name) + "/") for f in reversed(folders)]

    def _file_stamp(self, path: str, is_link: bool) -> str | None:
        """The stamp of a file, or None when the file is listed at another path."""
        try:
            st = os.stat(path)
        except OSError:
            return "missing"
        if is_link or st.st_nlink > 1:
            if is_link and stat.S_ISREG(st.st_mode) and _within(os.path.realpath(path), self.root):
                return None  # its target is listed under its own path (own split and class)
            key = (st.st_dev, st.st_ino)
            if key in self._files:
                return None
            self._files.add(key)
        return f"{st.st_size}:{st.st_mtime_ns}"

    def _enter(self, entry: os.DirEntry) -> bool:
        """Whether to descend into a folder entry: a real folder not walked yet, or a link
        that leads outside the root (and not to a folder that holds it)."""
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if _within(target, self.root) or _within(self.root, target):
                self._report(entry.path, f"is a link to {names.escape(target)!r}, which is the data root, inside it or "
                                         f"holds it; not followed (those files are listed under their own path)")
                return False
        try:
            st = entry.stat()
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in self._folders:
            self._report(entry.path, "leads to a folder already listed; not followed again")
            return False
        self._folders.add(key)
        return True

    def _report(self, path: str, problem: str) -> None:
        if path not in self._reported:
            self._reported.add(path)
            log.warning("listing %s: %s %s", names.escape(self.root), names.escape(path), problem)
