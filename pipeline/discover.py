"""Finding image files and their labels under a data root: a local folder or any URI
that ``pipeline.storage`` reads (``s3://bucket/photos``).

Only paths are listed here (never pixels), so the driver's memory grows with the
number of files, not with their contents. Each file's path is a local path or a full
URI, so a decode task on any node of a cluster can open it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from pipeline import storage
from pipeline.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
REQUIRED_SPLITS = ("train", "validation")
OPTIONAL_SPLITS = ("test",)


@dataclass(frozen=True)
class LabeledFile:
    """One image file: where it is, where it sits under the data root, its split and label."""

    path: str
    relpath: str
    split: str
    label: int
    class_name: str
    # size:mtime_ns when listed ("missing" for a broken link): what the extraction fingerprints.
    stamp: str = ""


@dataclass
class DatasetIndex:
    """Every image file of a data root, by split, with the sorted class names."""

    root: str
    layout: str
    classes: list[str]
    splits: dict[str, list[LabeledFile]] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of files per split and class."""
        out = {}
        for split, files in self.splits.items():
            c = Counter(f.class_name for f in files)
            out[split] = {name: c.get(name, 0) for name in self.classes}
        return out

    def fingerprint(self) -> str:
        """A hash of the classes and every file's split, path, label, size and modification time."""
        h = hashlib.sha256(json.dumps([self.layout, self.classes]).encode())
        for f in self.all_files():
            h.update(f"{f.split}\0{f.relpath}\0{f.label}\0{f.stamp}\n".encode())
        return h.hexdigest()

    def all_files(self) -> Iterator[LabeledFile]:
        """Every file of every split, in a fixed order."""
        for split in self.splits:
            yield from self.splits[split]


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions, compared case-insensitively."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def iter_image_files(root: str) -> Iterator[tuple[str, str, str]]:
    """``(path, path relative to root, stamp)`` of every image file under ``root`` (a local path
    or URI), recursively, sorted, hidden files and folders skipped.

    Symlinks to files are listed even when broken, so that decoding records them as
    rejects rather than letting them vanish; a folder whose name ends in ``.jpg`` is
    a folder and is descended into, never listed.
    """
    for rel, stamp in storage.walk_files(root):
        if is_image_name(rel):
            yield storage.join(root, rel), rel, stamp


def check_root(root: str) -> None:
    """Raise DataError naming ``root`` and what is wrong when it is not a readable folder."""
    problem = storage.describe_problem(root, "folder")
    if problem:
        raise DataError(f"data folder {root!r} cannot be used: {problem}")


def _class_dirs(split_dir: str) -> list[str]:
    return storage.list_dirs(split_dir)


def _limit(files: list[LabeledFile], max_per_class: int | None) -> list[LabeledFile]:
    if max_per_class is None:
        return files
    seen: Counter[str] = Counter()
    kept = []
    for f in files:
        if seen[f.class_name] < max_per_class:
            seen[f.class_name] += 1
            kept.append(f)
    return kept


def discover_splits(root: str, max_per_class: int | None = None) -> DatasetIndex:
    """Index ``<root>/<split>/<class>/<image>`` with splits train, validation and optional test."""
    check_root(root)
    found = storage.list_dirs(root)
    present = [s for s in REQUIRED_SPLITS + OPTIONAL_SPLITS if s in found]
    missing = [s for s in REQUIRED_SPLITS if s not in present]
    if missing:
        raise DataError(
            f"data folder {root!r} must hold the split folders {', '.join(REQUIRED_SPLITS)} "
            f"(and optionally test), each with one folder per class; missing: {', '.join(missing)}; "
            f"found: {', '.join(found) or 'nothing'}. For a flat folder of cat.1.jpg-style files use --layout kaggle"
        )
    class_sets = {s: _class_dirs(storage.join(root, s)) for s in present}
    reference = class_sets["train"]
    for split, names in class_sets.items():
        if names != reference:
            raise DataError(
                f"class folders differ between splits: train has [{', '.join(reference)}] but "
                f"{split} has [{', '.join(names)}]; every split needs the same class folders"
            )
    if len(reference) < 2:
        raise DataError(
            f"need at least two class folders under {storage.join(root, 'train')!r}; "
            f"found [{', '.join(reference)}]"
        )
    index = DatasetIndex(root=root, layout="splits", classes=reference)
    for split in present:
        files = []
        for label, name in enumerate(reference):
            class_dir = storage.join(root, split, name)
            for path, rel, stamp in iter_image_files(class_dir):
                files.append(LabeledFile(path, "/".join((split, name, rel)), split, label, name, stamp))
        files = _limit(files, max_per_class)
        if not files:
            raise DataError(f"split {split!r} under {root!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        index.splits[split] = files
    _require_every_class(index)
    return index


def _require_every_class(index: DatasetIndex) -> None:
    for split, counts in index.counts().items():
        empty = [name for name, n in counts.items() if n == 0]
        if empty:
            raise DataError(f"split {split!r} has no images for class(es) {', '.join(empty)}")


def _kaggle_label(name: str) -> str:
    stem = os.path.basename(name)
    label = stem.split(".", 1)[0] if "." in os.path.splitext(stem)[0] else ""
    return label.lower()


def kaggle_split(relpath: str, validation_fraction: float) -> str:
    """The split of a file in Kaggle's flat layout: a stable hash of its path, not its order."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if position < validation_fraction else "train"


def discover_kaggle(root: str, validation_fraction: float, max_per_class: int | None = None) -> DatasetIndex:
    """Index Kaggle's flat layout (``cat.123.jpg``): label = file-name prefix, split by path hash."""
    check_root(root)
    entries = []
    unlabeled = []
    for path, rel, stamp in iter_image_files(root):
        label = _kaggle_label(rel)
        if label:
            entries.append((path, rel, label, stamp))
        else:
            unlabeled.append(rel)
    if unlabeled:
        raise DataError(
            f"--layout kaggle needs file names like 'cat.123.jpg' (label, dot, id); "
            f"{len(unlabeled)} file(s) have no label prefix, e.g. {unlabeled[0]!r}"
        )
    if not entries:
        raise DataError(f"data folder {root!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    classes = sorted({label for _, _, label, _ in entries})
    if len(classes) < 2:
        raise DataError(f"need at least two classes; every file in {root!r} is labelled {classes[0]!r}")
    label_of = {name: i for i, name in enumerate(classes)}
    index = DatasetIndex(root=root, layout="kaggle", classes=classes)
    by_split: dict[str, list[LabeledFile]] = {"train": [], "validation": []}
    for path, rel, label, stamp in entries:
        split = kaggle_split(rel, validation_fraction)
        by_split[split].append(LabeledFile(path, rel, split, label_of[label], label, stamp))
    for split, files in by_split.items():
        files.sort(key=lambda f: (f.label, f.relpath))
        files = _limit(files, max_per_class)
        if not files:
            raise DataError(f"split {split!r} is empty; adjust --validation-fraction")
        index.splits[split] = files
    _require_every_class(index)
    return index


def discover(root: str, layout: str = "splits", validation_fraction: float = 0.2,
             max_per_class: int | None = None) -> DatasetIndex:
    """Index a labelled data root in either layout."""
    if layout == "kaggle":
        return discover_kaggle(root, validation_fraction, max_per_class)
    return discover_splits(root, max_per_class)


def discover_unlabeled(root: str) -> list[tuple[str, str]]:
    """``(path, path relative to root)`` of every image file under ``root`` (for prediction:
    any nesting, no labels needed)."""
    check_root(root)
    files = [(path, rel) for path, rel, _ in iter_image_files(root)]
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root!r}")
    return files
