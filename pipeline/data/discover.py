"""Finding image files and their labels under a data root: a local folder or any URI that
``pipeline.data.storage`` reads (``s3://bucket/photos``).

Only paths are listed (never pixels), held as Arrow columns with no Python object per file, so the
listing's memory grows with the paths' total length alone: 78 MB at a million files (a file's full
location, ``root`` joined with its ``relpath``, is made only where it is read). Extraction and prediction
list in a task (``pipeline.batch.listing``), so their drivers hold those columns only as the object store's pages.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import names
from pipeline.data import storage
from pipeline.data.localtree import LocalTree
from pipeline.data.synthetic import default_data_dir, is_synthetic, note_builtin_data
from pipeline.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
REQUIRED_SPLITS = ("train", "validation")
OPTIONAL_SPLITS = ("test",)
# ``stamp`` is size:mtime_ns when listed ("missing" for a broken link): what tells a changed file.
FILE_SCHEMA = pa.schema([("relpath", pa.string()), ("split", pa.string()), ("label", pa.int32()),
                         ("class_name", pa.string()), ("stamp", pa.string())])
# Listing is turned into Arrow this many files at a time, so Python strings never pile up.
CHUNK_FILES = 8192


@dataclass
class DatasetIndex:
    """Every image file of a data root: one ``FILE_SCHEMA`` row per file, split by split in a
    fixed order (class by class, then by path), and the sorted class names."""

    root: str
    layout: str
    classes: list[str]
    files: pa.Table
    # Files that listing passed over because their names are not image names, by extension:
    # what a user looks at when photos seem to be missing (HEIC, TIFF, RAW...).
    ignored: dict[str, int] = field(default_factory=dict)
    # What --exclude left out: its file, the file's sha256, the paths it lists and those found (None: no --exclude).
    excluded: dict[str, Any] | None = None

    @property
    def split_names(self) -> list[str]:
        """The splits present, in the order their files are listed."""
        return list(dict.fromkeys(self.files.column("split").unique().to_pylist()))

    def split(self, name: str) -> pa.Table:
        """The files of one split."""
        return self.files.filter(pc.equal(self.files.column("split"), name))

    def counts(self, files: pa.Table | None = None) -> dict[str, dict[str, int]]:
        """Number of files per split and class, of the index or of ``files`` (some of its rows)."""
        files = self.files if files is None else files
        grouped = files.group_by(["split", "class_name"]).aggregate([("relpath", "count")]).to_pylist()
        found = {(g["split"], g["class_name"]): g["relpath_count"] for g in grouped}
        return {split: {name: found.get((split, name), 0) for name in self.classes} for split in self.split_names}

    def fingerprint(self) -> str:
        """A hash of the classes and every file's split, path, label and stamp."""
        return fingerprint_files(self.files, (self.layout, self.classes))

    def path(self, relpath: str) -> str:
        """Where a file of the index is (a local path or a URI), in stored form: ``names.os_path``
        of it opens the file."""
        return storage.join(names.escape(self.root), relpath)

    def rows(self, split: str | None = None) -> list[dict[str, Any]]:
        """The files (of one split, or all) as dicts with their full ``path``: for the small file
        lists of training, never for a whole large root."""
        table = self.files if split is None else self.split(split)
        return [{**r, "path": self.path(r["relpath"])} for r in table.to_pylist()]


def fingerprint_files(files: pa.Table, *extra: Any) -> str:
    """A hash of ``extra`` and every column of ``files``, row by row."""
    h = hashlib.sha256(repr(extra).encode())
    for batch in files.to_batches(CHUNK_FILES):
        for column in batch.columns:
            h.update("\0".join(map(str, column.to_pylist())).encode() + b"\n")
    return h.hexdigest()


def columnar(rows: Iterable[tuple], schema: pa.Schema = FILE_SCHEMA) -> pa.Table:
    """A table of ``schema`` from tuples in its column order, converted ``CHUNK_FILES`` at a time."""
    chunks = []
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, CHUNK_FILES)):
        chunks.append(pa.Table.from_arrays([_column(c, f.type) for c, f in zip(zip(*chunk), schema)], schema=schema))
    return pa.concat_tables(chunks) if chunks else schema.empty_table()


def _column(values: tuple, type_: pa.DataType) -> pa.Array:
    if type_ != pa.string():
        return pa.array(values, type=type_)
    # Strings go in as one joined buffer: pa.array() over Python strings keeps its builders'
    # growth slack, which doubled the driver's memory for the paths of a million files.
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions, compared case-insensitively."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def iter_image_files(root: str, tree: LocalTree | None = None,
                     ignored: collections.Counter | None = None) -> Iterator[tuple[str, str]]:
    """``storage.walk_files`` of ``root`` less the files without an image name, which are counted in ``ignored`` by
    lower-cased extension (``""`` for none) when given. Broken links are listed (decoding records them as rejects);
    a folder named ``x.jpg`` is descended into, never listed."""
    for rel, stamp in storage.walk_files(root, tree):
        if is_image_name(rel):
            yield rel, stamp
        elif ignored is not None:
            ignored[os.path.splitext(rel)[1].lower()] += 1


@dataclass(frozen=True)
class Exclusion:
    """The photos a user chose to leave out (``--exclude FILE``): stored paths relative to the data
    root, as the feature shards' ``path`` column (and the audit's ``suspects.txt``) holds them."""

    location: str
    sha256: str
    paths: frozenset[str]

    def record(self, found: int) -> dict[str, Any]:
        """What a manifest records of it: the file, its sha256, the paths listed and those found and left out."""
        return {"file": self.location, "sha256": self.sha256, "listed": len(self.paths), "excluded": found}


def read_exclusion(location: str) -> Exclusion:
    """An exclusion file: one stored path a line (a trailing carriage return dropped, blank lines skipped)."""
    data = storage.read_bytes(location)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--exclude {location!r} is not UTF-8 text (byte {exc.start}); it lists stored paths, one a "
                        f"line, as the feature shards' path column and the audit's suspects.txt hold them") from exc
    paths = frozenset(line.removesuffix("\r") for line in text.split("\n") if line.strip())
    return Exclusion(location, hashlib.sha256(data).hexdigest(), paths)


def _without(rows: Iterator[tuple], exclusion: Exclusion | None, found: collections.Counter) -> Iterator[tuple]:
    """``rows`` less those whose relpath (first field) ``exclusion`` lists, counted in ``found``."""
    for row in rows:
        if exclusion is not None and row[0] in exclusion.paths:
            found["excluded"] += 1
        else:
            yield row


def _note_exclusion(index: DatasetIndex, exclusion: Exclusion | None, found: collections.Counter) -> DatasetIndex:
    if exclusion is not None:
        index.excluded = exclusion.record(found["excluded"])
        if found["excluded"] < len(exclusion.paths):
            log.warning(f"{len(exclusion.paths) - found['excluded']} of the {len(exclusion.paths)} paths of --exclude "
                        f"{exclusion.location} are not among the image files listed under {index.root} (paths are "
                        f"relative to the data root, e.g. train/cats/cat.1.jpg)")
    return index


def check_root(root: str) -> None:
    """Raise DataError naming ``root`` and what is wrong when it is not a readable folder."""
    problem = storage.describe_problem(root, "folder")
    if problem:
        raise DataError(f"data folder {root!r} cannot be used: {problem}")


def discover_splits(root: str, max_per_class: int | None = None, exclusion: Exclusion | None = None) -> DatasetIndex:
    """Index ``<root>/<split>/<class>/<image>`` with splits train, validation and optional test,
    less the files ``exclusion`` lists."""
    check_root(root)
    found = storage.list_dirs(root)
    present = [s for s in REQUIRED_SPLITS + OPTIONAL_SPLITS if s in found]
    missing = [s for s in REQUIRED_SPLITS if s not in present]
    if missing:
        raise DataError(f"data folder {root!r} must hold the split folders {', '.join(REQUIRED_SPLITS)} (and "
                        f"optionally test), each with one folder per class; missing: {', '.join(missing)}; found: "
                        f"{', '.join(found) or 'nothing'}. For a flat folder of cat.1.jpg-style files use "
                        f"--layout kaggle")
    class_sets = {s: storage.list_dirs(storage.join(root, s)) for s in present}
    reference = class_sets["train"]
    for split, folders in class_sets.items():
        if folders != reference:
            raise DataError(f"class folders differ between splits: train has [{', '.join(reference)}] but {split} "
                            f"has [{', '.join(folders)}]; every split needs the same class folders")
    if len(reference) < 2:
        raise DataError(f"need at least two class folders under {storage.join(root, 'train')!r}; "
                        f"found [{', '.join(reference)}]")

    tree = storage.local_tree(root)
    ignored: collections.Counter = collections.Counter()
    found: collections.Counter = collections.Counter()

    def rows() -> Iterator[tuple]:
        for split in present:
            for label, name in enumerate(reference):
                listed = iter_image_files(storage.join(root, split, names.os_path(name)), tree, ignored)
                labelled = ((f"{split}/{name}/{rel}", split, label, name, stamp) for rel, stamp in listed)
                yield from itertools.islice(_without(labelled, exclusion, found), max_per_class)

    index = DatasetIndex(root=root, layout="splits", classes=reference, files=columnar(rows()))
    index.ignored = dict(sorted(ignored.items()))
    _note_exclusion(index, exclusion, found)
    for split in present:
        if split not in index.split_names:
            raise DataError(f"split {split!r} under {root!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
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


def discover_kaggle(root: str, validation_fraction: float, max_per_class: int | None = None,
                    exclusion: Exclusion | None = None) -> DatasetIndex:
    """Index Kaggle's flat layout (``cat.123.jpg``): label = file-name prefix, split by path hash;
    less the files ``exclusion`` lists."""
    check_root(root)
    unlabeled: list[str] = []
    ignored: collections.Counter = collections.Counter()
    found: collections.Counter = collections.Counter()

    def rows() -> Iterator[tuple]:
        for rel, stamp in iter_image_files(root, ignored=ignored):
            label = _kaggle_label(rel)
            if not label:
                unlabeled.append(rel)
            elif not unlabeled:
                yield rel, kaggle_split(rel, validation_fraction), 0, label, stamp

    files = columnar(_without(rows(), exclusion, found))
    if unlabeled:
        raise DataError(f"--layout kaggle needs file names like 'cat.123.jpg' (label, dot, id); "
                        f"{len(unlabeled)} file(s) have no label prefix, e.g. {unlabeled[0]!r}")
    if not len(files):
        raise DataError(f"data folder {root!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    classes = sorted(files.column("class_name").unique().to_pylist())
    if len(classes) < 2:
        raise DataError(f"need at least two classes; every file in {root!r} is labelled {classes[0]!r}")
    labels = pc.index_in(files.column("class_name"), value_set=pa.array(classes)).cast(pa.int32())
    files = files.set_column(2, "label", labels)
    parts = []
    for split in REQUIRED_SPLITS:
        chosen = files.filter(pc.equal(files.column("split"), split)).sort_by([("label", "ascending"),
                                                                              ("relpath", "ascending")])
        if max_per_class is not None:
            chosen = pa.concat_tables(chosen.filter(pc.equal(chosen.column("label"), i)).slice(0, max_per_class)
                                      for i in range(len(classes)))
        if not len(chosen):
            raise DataError(f"split {split!r} is empty; adjust --validation-fraction")
        parts.append(chosen)
    index = DatasetIndex(root=root, layout="kaggle", classes=classes, files=pa.concat_tables(parts),
                         ignored=dict(sorted(ignored.items())))
    _require_every_class(index)
    return _note_exclusion(index, exclusion, found)


def discover(root: str, layout: str = "splits", validation_fraction: float = 0.2,
             max_per_class: int | None = None, exclude: str | None = None) -> DatasetIndex:
    """Index a labelled data root in either layout, less the files that the ``exclude`` file lists."""
    exclusion = read_exclusion(exclude) if exclude else None
    if layout == "kaggle":
        return discover_kaggle(root, validation_fraction, max_per_class, exclusion)
    return discover_splits(root, max_per_class, exclusion)


def resolve_data(cfg: Any, *under: str, listed: bool = True) -> tuple[str, bool, str, DatasetIndex | None]:
    """A job's data root from its options (``config.DataOptions`` and ``output_dir``): that root (the built-in
    synthetic set when there is no --data-dir), whether it is that set (then noted once), the output folder
    (default ``outputs/<data folder name>/<under...>``) and, when ``listed``, the root's ``discover`` index."""
    root = cfg.data_dir or default_data_dir()
    synthetic = is_synthetic(root)
    if synthetic:
        note_builtin_data()
    output_dir = cfg.output_dir or os.path.join("outputs", storage.basename(root), *under)
    if not listed:
        return root, synthetic, output_dir, None
    return root, synthetic, output_dir, discover_with(root, cfg)


def discover_with(root: str, options: Any) -> DatasetIndex:
    """``discover(root)`` with a job's data options (``config.DataOptions``)."""
    return discover(root, options.layout, options.validation_fraction, options.max_images_per_class, options.exclude)


UNLABELED_SCHEMA = pa.schema([("relpath", pa.string()), ("stamp", pa.string())])


def discover_unlabeled(root: str) -> pa.Table:
    """``relpath`` and ``stamp`` of every image file under ``root`` (for prediction: any nesting,
    no labels needed)."""
    check_root(root)
    files = columnar(iter_image_files(root), UNLABELED_SCHEMA)
    if not len(files):
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root!r}")
    return files
