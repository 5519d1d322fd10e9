"""The ledger of an output folder: which input files are already done, so that an interrupted
run resumes where it stopped and a rerun over a changed data root redoes only what changed.

Each write task commits a block in two steps: its data files (``<folder>/<part>.parquet``, named by
run and write task, so a task that Ray retries overwrites its own files), then one ledger entry
``_ledger/<part>.parquet`` listing the block's files (``relpath``, ``split``, ``stamp`` and a
reject's ``reason``/``error``). A part without an entry was cut off mid-write and the next run
deletes it; one with an entry is done. A complete run folds the entries into ``ledger.parquet``.

A rerun compares the listing with the ledger by ``KEYS``: listed files not in the ledger are
processed; rows no longer listed (removed or changed) are dropped by rewriting their parts as new
parts whose entries name the part they ``replaces``; replaced parts are deleted whenever found.

Not Ray Data's checkpointing (``DataContext.checkpoint_config``): it filters a ``Read`` datasource's
rows by id, while these rows come from the driver's listing; it records which ids were written, not
from what, so a changed file goes unnoticed; it deletes itself when a run succeeds, so a rerun over
a grown folder would start from zero; and it needs a path every node reaches, where this ledger
lives in the output itself.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data import outputs, storage
from pipeline.data.reuse import require_same
from pipeline.data.shards import read_split
from pipeline.errors import OutputError

log = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
LEDGER_FILE = "ledger.parquet"
RUN_FILE = "run.json"
KEYS = ["relpath", "split", "stamp"]
SCHEMA = pa.schema([("relpath", pa.string()), ("split", pa.string()), ("stamp", pa.string()),
                    ("part", pa.string()), ("reason", pa.string()), ("error", pa.string())])
REPLACES = b"replaces"
# What a ledger output holds besides its data folders (for ``outputs.Layout``).
FILES = (RUN_FILE, LEDGER_FILE, f"{LEDGER_DIR}/part-*.parquet")
# Every part name this module makes (``part_name``, ``drop_rows``): one path component, no dots.
_PART_NAME = re.compile(r"part-[A-Za-z0-9_-]+")


def new_run_id() -> str:
    """A name for this run's parts: when it started, and a random suffix."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def part_name(run_id: str, task_idx: int, n: int) -> str:
    """The name of the ``n``-th block written by write task ``task_idx`` of run ``run_id``."""
    return f"part-{run_id}-{task_idx:05d}-{n:04d}"


def write_entry(output: str, part: str, rows: dict[str, Any], replaces: str | None = None) -> None:
    """Commit ``part``: its ledger entry listing ``rows`` (``relpath``, ``split``, ``stamp``,
    ``reason``, ``error``); written after the part's data files."""
    if not all(_PART_NAME.fullmatch(name) for name in [part] + ([replaces] if replaces else [])):
        raise ValueError(f"not a part name: {part!r} (replacing {replaces!r})")
    columns = {name: [str(v) for v in rows[name]] for name in ("relpath", "split", "stamp", "reason", "error")}
    table = pa.table({**columns, "part": [part] * len(rows["relpath"])},
                     schema=SCHEMA.with_metadata({REPLACES: replaces or ""}))
    storage.write_parquet(storage.join(output, LEDGER_DIR, f"{part}.parquet"), table)


def load(output: str) -> tuple[pa.Table, set[str]]:
    """The live rows of ``output``'s ledger (its ``ledger.parquet`` and the entries committed
    since) and the names of the parts that later parts replaced."""
    folded = storage.join(output, LEDGER_FILE)
    tables = [storage.read_parquet(folded)] if storage.exists(folded) else []
    entries = storage.list_parquet(storage.join(output, LEDGER_DIR))
    with ThreadPoolExecutor(storage.READ_THREADS) as pool:
        read = list(pool.map(storage.read_parquet, entries))
    replaces = [(t.schema.metadata or {}).get(REPLACES, b"").decode() for t in read]
    for entry, table, old in zip(entries, read, replaces):
        _check_parts(entry, table, old)
    replaced = set(replaces) - {""}
    if tables:
        _check_parts(folded, tables[0], "")
        # Less any entry folded into it by a run cut off before it removed the entries.
        fresh = pa.array(sorted(storage.basename(e)[:-len(".parquet")] for e in entries), pa.string())
        tables[0] = tables[0].filter(pc.invert(pc.is_in(tables[0].column("part"), fresh)))
    table = pa.concat_tables([t.cast(SCHEMA) for t in tables + read]) if tables or read else SCHEMA.empty_table()
    live = table.filter(pc.invert(pc.is_in(table.column("part"), pa.array(sorted(replaced), pa.string()))))
    return live, replaced


def _check_parts(entry: str, table: pa.Table, replaces: str) -> None:
    """OutputError naming ``entry`` when a part name in it (its ``part`` column, the part it
    ``replaces``) is not one this project makes: such a name would be joined into paths to delete."""
    names = set(table.column("part").unique().to_pylist()) | ({replaces} if replaces else set())
    bad = sorted(str(n) for n in names if not isinstance(n, str) or not _PART_NAME.fullmatch(n))
    if bad:
        raise OutputError(f"the ledger entry {entry} names part {bad[0]!r}, which this project never writes (a "
                          f"damaged or edited ledger); nothing was deleted. Rerun with --overwrite to redo the output")


def _delete(output: str, uri: str, source: str) -> None:
    """Delete one file of ``output``, after checking that it lies inside it."""
    storage.delete_file(outputs.require_inside(output, uri, source))


def data_parts(output: str, folders: list[str]) -> dict[str, list[str]]:
    """Every file in ``folders`` of ``output``, by the part it belongs to (leftover temporary files too)."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for rel, _ in storage.walk_files(storage.join(output, folder)):
            if "/" not in rel and rel.startswith("part-"):
                found.setdefault(rel.split(".parquet", 1)[0], []).append(storage.join(output, folder, rel))
    return found


def remove_unfinished(output: str, live: pa.Table, replaced: set[str], parts: dict[str, list[str]]) -> None:
    """Delete the files of parts that have no entry (cut off mid-write) or were replaced, and the
    entries of replaced parts."""
    keep = set(live.column("part").unique().to_pylist())
    for part, files in parts.items():
        for uri in files:
            if part not in keep or not uri.endswith(f"/{part}.parquet"):
                _delete(output, uri, f"the unfinished part {part}")
    for part in replaced:
        _delete(output, storage.join(output, LEDGER_DIR, f"{part}.parquet"), f"the replaced part {part!r}")


@dataclass
class Update:
    """What a rerun has to do: the listed files to process (``todo``), the ledger rows to drop
    (``stale``), and the counts of added, changed, removed and reused files."""

    todo: pa.Table
    stale: pa.Table
    counts: dict[str, int]


def plan(listing: pa.Table, live: pa.Table) -> Update:
    """Compare the data root's ``listing`` with the ledger's ``live`` rows by ``KEYS``."""
    if not len(live):  # a first run: no copy of a listing that may hold millions of paths
        return Update(todo=listing, stale=live, counts={"added": len(listing), "changed": 0, "removed": 0, "reused": 0})
    todo = listing.join(live.select(KEYS), KEYS, join_type="left anti")
    stale = live.join(listing.select(KEYS), KEYS, join_type="left anti")
    changed = pc.is_in(todo.column("relpath"), stale.column("relpath"))
    n_changed = pc.sum(changed).as_py() or 0
    counts = {"added": len(todo) - n_changed, "changed": n_changed, "removed": len(stale) - n_changed,
              "reused": len(live) - len(stale)}
    return Update(todo=todo.sort_by("relpath"), stale=stale, counts=counts)


def drop_rows(output: str, stale: pa.Table, live: pa.Table, parts: dict[str, list[str]], run_id: str) -> None:
    """Rewrite every part that holds a ``stale`` row as a new part without those rows, whose
    entry replaces the old part; then delete the old part's files."""
    for i, part in enumerate(sorted(set(stale.column("part").to_pylist()))):
        gone = stale.filter(pc.equal(stale.column("part"), part)).column("relpath")
        new = f"part-{run_id}-rewrite-{i:05d}"
        for uri in parts.get(part, []):
            table = storage.read_parquet(uri)
            kept = table.filter(pc.invert(pc.is_in(table.column("path"), gone)))
            if len(kept):
                storage.write_parquet(storage.join(storage.parent(uri), f"{new}.parquet"), kept)
        rows = live.filter(pc.and_(pc.equal(live.column("part"), part), pc.invert(pc.is_in(live.column("relpath"), gone))))
        write_entry(output, new, rows.to_pydict(), replaces=part)
        for uri in parts.get(part, []):
            _delete(output, uri, f"the rewritten part {part!r}")
        _delete(output, storage.join(output, LEDGER_DIR, f"{part}.parquet"), f"the rewritten part {part!r}")


def consolidate(output: str, live: pa.Table) -> None:
    """Fold the entries into one ``ledger.parquet`` (the live rows), then remove the entries."""
    storage.write_parquet(storage.join(output, LEDGER_FILE), live.cast(SCHEMA))
    storage.delete_dir(storage.join(output, LEDGER_DIR))


def open_output(output: str, layout: outputs.Layout, settings: dict[str, Any], overwrite: bool,
                marker: str = storage.MANIFEST) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the run record, the finished ``marker``'s contents) of ``output``, each None when absent, after
    ``outputs.prepare`` (with ``overwrite``: the earlier output deleted); OutputError when its record holds
    other settings."""
    outputs.prepare(output, layout, overwrite)
    if overwrite:
        return None, None
    run_file, marker_file = storage.join(output, RUN_FILE), storage.join(output, marker)
    record = storage.read_json(run_file) if storage.exists(run_file) else None
    finished = storage.read_json(marker_file) if storage.exists(marker_file) else None
    if record is None:
        if finished is not None:
            require_same(output, layout.what, finished.get("settings"), settings)
        return None, None
    require_same(output, layout.what, record["settings"], settings)
    return record, finished


def start(output: str, record: dict[str, Any], marker: str = storage.MANIFEST) -> None:
    """Record the run's settings, then remove the finished marker: from here until a new marker
    the output is being updated, not finished."""
    storage.write_json(storage.join(output, RUN_FILE), record)
    storage.delete_file(storage.join(output, marker))


def refresh(output: str, listing: pa.Table, folders: list[str], what: str,
            process: Callable[[pa.Table, str], Any]) -> tuple[pa.Table, Update, Any]:
    """Bring ``output`` up to date with ``listing``: remove unfinished parts, drop stale rows, call
    ``process(files to do, run id)`` when there are any, and check that every listed file is in
    the ledger exactly once. Returns the live ledger, the update and what ``process`` returned."""
    live, replaced = load(output)
    parts = data_parts(output, folders)
    remove_unfinished(output, live, replaced, parts)
    update = plan(listing, live)
    if len(live):
        log.info(f"{what} in {output}: " + ", ".join(f"{n} {key}" for key, n in update.counts.items()))
    run_id = new_run_id()
    drop_rows(output, update.stale, live, parts, run_id)
    result = process(update.todo, run_id) if len(update.todo) else None
    live, _ = load(output)
    check = plan(listing, live)
    duplicated = len(live) - pc.count_distinct(live.column("relpath")).as_py()
    if duplicated or len(check.todo) or len(check.stale):
        raise RuntimeError(f"{output} is inconsistent: {duplicated} duplicated, {len(check.todo)} missing and "
                           f"{len(check.stale)} unlisted files in its ledger; not finishing it")
    return live, update, result


def check_shards(output: str, live: pa.Table, folders: dict[str, str]) -> None:
    """Check that each of ``folders`` (folder → the split its rows belong to) holds exactly one
    row per decoded file of that split in the ledger; raises instead of finishing the output."""
    good = live.filter(pc.equal(live.column("reason"), ""))
    for folder, split in folders.items():
        expected = good.filter(pc.equal(good.column("split"), split)).column("relpath").sort().combine_chunks()
        shards = read_split(output, folder, ["path"])
        got = shards.column("path").sort().combine_chunks() if shards is not None else pa.array([], pa.string())
        if not got.equals(expected):
            dupes = len(got) - pc.count_distinct(got).as_py()
            raise RuntimeError(f"{storage.join(output, folder)} is inconsistent: {len(got)} rows ({dupes} duplicated) "
                               f"for {len(expected)} decoded files; not finishing it")


def rejects(live: pa.Table) -> pa.Table:
    """The files of the ledger that could not be decoded: ``path``, ``split``, ``reason``, ``error``."""
    bad = live.filter(pc.not_equal(live.column("reason"), ""))
    return pa.table({"path": bad.column("relpath"), "split": bad.column("split"), "reason": bad.column("reason"),
                     "error": bad.column("error")}).sort_by([("split", "ascending"), ("path", "ascending")])

