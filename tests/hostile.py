"""A data root holding what a million-file corpus holds: odd names, link loops, links in from
outside, hard links, huge and hostile images, among good photos; with what each file must become.

Used by ``tests/test_hostile_corpus.py`` and ``bench/hostile_corpus.py``. The expected stored
paths are written out literally (the escape rule of README: a byte that is not UTF-8 is
``\\xNN``, a backslash is ``\\\\``), not computed by the product's own escape function.
"""

from __future__ import annotations

import os
import shutil
import unicodedata
from dataclasses import dataclass, field

from tests.image_bombs import GREY, POSTSCRIPT, flat_png, jpeg_with_declared_size
from tests.images import bad_files, write

# Real photos under names that broke or could break a listing, a Parquet column or a CSV:
# (name on disk as bytes, the stored relpath's file name).
ODD_NAMES = [
    (b"chat\xe9.jpg", "chat\\xe9.jpg"),                      # Latin-1, as old cameras write it
    (b"new\nline.jpg", "new\nline.jpg"),
    (b'say "cheese", please.jpg', 'say "cheese", please.jpg'),
    (b"-rf --help.jpg", "-rf --help.jpg"),
    (b"back\\slash.jpg", "back\\\\slash.jpg"),
    (b"a" * 251 + b".jpg", "a" * 251 + ".jpg"),              # 255 bytes, the usual limit
    (unicodedata.normalize("NFC", "café.jpg").encode(), unicodedata.normalize("NFC", "café.jpg")),
    (unicodedata.normalize("NFD", "café.jpg").encode(), unicodedata.normalize("NFD", "café.jpg")),
]


@dataclass
class Expected:
    """What each listed file must become: ``rows`` relpath -> class, ``rejects`` relpath -> the
    accepted reasons; ``skipped_links`` the directory links that listing must not follow."""

    rows: dict[str, str] = field(default_factory=dict)
    rejects: dict[str, set[str]] = field(default_factory=dict)
    skipped_links: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)


def huge_png(side: int = 9400) -> bytes:
    """A 16-bit greyscale PNG of ``side`` x ``side`` pixels: a few hundred KB on disk, 177 MB as
    16-bit pixels (and 1.4 GB as the float64 copy decoding used to make)."""
    return flat_png(side, side, GREY, 16, 1000)


def _copy(photo: str, path: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copyfile(photo, path)


def build(root: str, outside: str, photos: dict[tuple[str, str], list[str]], huge: bytes | None = None) -> Expected:
    """Fill ``root`` (splits layout, classes cats and dogs) and ``outside`` (a folder linked in);
    ``photos[(split, cls)]`` are real photos copied in under their own names (at least 2 of
    train/cats). ``huge`` is the 16-bit PNG (made when not given)."""
    exp = Expected()
    for (split, cls), paths in photos.items():
        for p in paths:
            rel = f"{split}/{cls}/{os.path.basename(p)}"
            _copy(p, os.path.join(root, rel).encode())
            exp.rows[rel] = cls
    first, second = photos[("train", "cats")][:2]
    for disk, stored in ODD_NAMES:
        _copy(first, os.path.join(root.encode(), b"train/cats", disk))
        exp.rows[f"train/cats/{stored}"] = "cats"
    _links(root, outside, photos, exp, first, second)
    _rejects(root, exp, huge)
    return exp


def _links(root: str, outside: str, photos, exp: Expected, first: str, second: str) -> None:
    # Loops back into the root and a link to an ancestor of it: never followed.
    for link, target in (("train/dogs/loop", ".."), ("validation/dogs/again", "../.."),
                         ("train/cats/up", os.path.dirname(os.path.abspath(root)))):
        os.symlink(target, os.path.join(root, link))
        exp.skipped_links.append(link)
    # A folder of photos outside the root, linked in: followed, listed under the link's path.
    for p in photos[("validation", "dogs")][:2]:
        _copy(p, os.path.join(outside, "more_dogs", "x-" + os.path.basename(p)).encode())
        exp.rows[f"validation/dogs/linked/x-{os.path.basename(p)}"] = "dogs"
    os.symlink(os.path.join(outside, "more_dogs"), os.path.join(root, "validation/dogs/linked"))
    # One file by two paths is one row: a hard link (sorted after its original) and a file
    # symlink from another class folder to a photo inside the root.
    os.link(os.path.join(root, "train/cats", os.path.basename(first)), os.path.join(root, "train/cats/zz-hard.jpg"))
    os.symlink(os.path.join("..", "cats", os.path.basename(second)), os.path.join(root, "train/dogs/alias.jpg"))


def _rejects(root: str, exp: Expected, huge: bytes | None) -> None:
    folder = os.path.join(root, "train", "dogs")
    for name, reason in bad_files(folder).items():
        exp.rejects[f"train/dogs/{name}"] = {reason}
    write(os.path.join(folder, "huge16.png"), huge if huge is not None else huge_png())
    exp.rejects["train/dogs/huge16.png"] = {"too large"}
    write(os.path.join(folder, "poster.jpg"), POSTSCRIPT)
    exp.rejects["train/dogs/poster.jpg"] = {"unsupported format"}
    # Its header declares 4000x4000 (under the pixel cap, so only its data can betray it).
    write(os.path.join(folder, "liar.jpg"), jpeg_with_declared_size(4000, 4000))
    exp.rejects["train/dogs/liar.jpg"] = {"truncated"}
    # A FIFO and a device under photo names: opening them for reading would block (or never end).
    os.mkfifo(os.path.join(folder, "fifo.jpg"))
    os.symlink("/dev/zero", os.path.join(folder, "zeros.jpg"))
    exp.rejects["train/dogs/fifo.jpg"] = {"not a file"}
    exp.rejects["train/dogs/zeros.jpg"] = {"not a file"}
    # Not image names: never read, counted by extension in the manifest and named in the log.
    for name in ("notes.txt", "IMG_0001.HEIC", "scan.tiff", "README"):
        write(os.path.join(folder, name), b"not read")
    exp.ignored = {"": 1, ".heic": 1, ".tiff": 1, ".txt": 1}
