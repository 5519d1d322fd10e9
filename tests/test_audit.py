"""The data set doctor (jobs.audit_data): planted duplicates across splits, flipped labels and strays
are found with their recall and precision checked, a clean corpus yields few findings, the report
renders in a headless browser with every thumbnail loaded, and the job's outputs follow the
project's reuse and overwrite rules."""

from __future__ import annotations

import csv
import html
import io
import os
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.audit import duplicates, labels, leakage, report, strays
from pipeline.audit.doctor import audit_data
from pipeline.audit.pooled import Corpus, normalise, pool
from pipeline.batch.extract import run_extraction
from pipeline.config import AuditConfig, ExtractConfig
from pipeline.data.discover import discover
from pipeline.errors import ConfigError, DataError, OutputError
from pipeline.prechecks import preflight
from tests.conftest import make_real_root
from tests.images import jpeg_bytes, write
from tests.planted import EDITS, flip, write_copy, write_strays

pytestmark = pytest.mark.timeout(900)

CLASSES = ("cats", "dogs")
PER_CLASS = 15  # photos per class and split: 60 real photos
FLIPPED = ["train/cats/cat.1.jpg", "train/dogs/dog.10.jpg", "validation/cats/cat.1001.jpg"]
# Copies into the other split, one edit each (two kinds twice): the leakage to find.
COPIED = ["train/cats/cat.100.jpg", "train/dogs/dog.100.jpg", "train/cats/cat.101.jpg",
          "validation/dogs/dog.1003.jpg", "validation/cats/cat.1002.jpg", "validation/dogs/dog.1002.jpg"]
STRAYS = ["train/cats", "train/dogs", "validation/dogs"]


def _corpus(features: np.ndarray, splits: list[str], labels_: list[int]) -> Corpus:
    return Corpus(paths=np.asarray([f"{s}/c{l}/p{i}.jpg" for i, (s, l) in enumerate(zip(splits, labels_))], dtype=object),
                  splits=np.asarray(splits, dtype=object), labels=np.asarray(labels_), classes=["a", "b"],
                  features=normalise(features), root="/nowhere", manifest={})


def _nearest(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What pipeline.audit.neighbours.nearest returns, by brute force (no Ray)."""
    gram = x @ x.T
    np.fill_diagonal(gram, -np.inf)
    ids = np.argsort(-gram, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(gram, ids, axis=1), ids


def test_exact_and_near_copies_are_paired_grouped_and_leakage_is_across_splits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16))
    x[3] = x[0] + rng.normal(scale=0.01, size=16)  # a near copy of 0, in another split
    corpus = _corpus(x, ["train", "train", "train", "validation", "validation", "train", "train", "validation"],
                     [0, 1, 0, 0, 1, 1, 1, 0])
    digests = np.asarray([f"d{i}" for i in range(8)], dtype=object)
    digests[6] = digests[5]  # the same file bytes twice (features that differ, as a decoder change might give)
    digests[2] = ""  # unreadable: never an exact duplicate of another unreadable file
    digests[7] = ""
    sims, ids = _nearest(corpus.features, 3)
    dups = duplicates.find_duplicates(corpus, digests, sims, ids, threshold=0.95)
    assert sorted(zip(dups.a.tolist(), dups.b.tolist())) == [(0, 3), (5, 6)]
    found = dict(zip(zip(dups.a.tolist(), dups.b.tolist()), zip(dups.exact.tolist(), dups.cross_split.tolist())))
    assert found == {(0, 3): (False, True), (5, 6): (True, False)}
    assert dups.group[0] == dups.group[3] != dups.group[5] == dups.group[6] and (dups.group[[1, 2, 4, 7]] == -1).all()
    assert leakage.leaked(corpus, dups).tolist() == [False, False, False, True, False, False, False, False]
    table = dups.table(corpus)
    assert table.column("leakage").to_pylist() == [True, False], "leakage pairs come first"


def test_pooling_takes_the_square_root_of_the_grid_mean_at_unit_length():
    grid = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 12)
    expected = np.sqrt(grid.reshape(4, 3).mean(axis=0))
    assert np.allclose(pool(grid, [2, 2, 3])[0], expected / np.linalg.norm(expected))


def test_strays_far_from_every_class_score_highest_and_are_flagged():
    rng = np.random.default_rng(1)
    centres = np.eye(32)[:2] * 5
    x = np.concatenate([np.stack([centres[i % 2] + rng.normal(size=32) for i in range(200)]),
                        5 * np.eye(32)[[10, 11, 12]] + rng.normal(scale=0.3, size=(3, 32))])
    labels_ = [i % 2 for i in range(200)] + [0, 1, 0]
    found = strays.stray_scores(_corpus(x, ["train"] * 203, labels_))
    assert set(np.argsort(-found.score)[:3].tolist()) == {200, 201, 202}
    assert np.flatnonzero(found.flagged).tolist() == [200, 201, 202]


def test_confident_learning_ranks_the_flipped_labels_first():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, size=200)
    p1 = np.clip(np.where(truth == 1, 0.9, 0.1) + rng.normal(scale=0.05, size=200), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1).astype(np.float32)
    given = truth.copy()
    given[[3, 50, 120]] = 1 - given[[3, 50, 120]]
    found = labels.label_issues(given, probs)
    assert set(np.argsort(found.quality)[:3].tolist()) == {3, 50, 120}
    assert set(np.flatnonzero(found.flagged).tolist()) == {3, 50, 120}
    assert (found.suggested[[3, 50, 120]] == truth[[3, 50, 120]]).all()


def test_the_accuracy_effect_counts_the_held_out_photos_with_a_copy_in_training():
    corpus = _corpus(np.eye(6), ["train", "train", "validation", "validation", "validation", "validation"],
                     [0, 1, 0, 1, 0, 1])
    probs = np.asarray([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    leaked_rows = np.asarray([False, False, True, False, False, False])
    [row] = leakage.accuracy_effect(corpus, leaked_rows, probs, "cross-validation")
    assert row == {"split": "validation", "photos": 4, "leaked": 1, "accuracy": 0.5,
                   "accuracy_without_leaked": round(1 / 3, 4), "source": "cross-validation"}


def test_a_name_in_the_page_is_text_never_markup():
    name = 'train/cats/<img src=x onerror="alert(1)">.jpg'
    page = report.section("Strays", "note", [[report.Photo(name, "train", "cats & <b>")]], {name})
    assert "<img src=x" not in page and html.escape(name) in page and "cats &amp; &lt;b&gt;" in page
    assert f'src="thumbs/{report.thumb_name(name)}"' in page


def test_thumbnails_open_only_the_decoders_formats(tmp_path):
    """A TIFF (Pillow opens it; the decoder does not) gets no thumbnail, like an EPS would, which Pillow hands
    to Ghostscript; a JPEG beside it gets one."""
    tiff = io.BytesIO()
    Image.new("RGB", (32, 32)).save(tiff, "TIFF")
    write(str(tmp_path / "root" / "a.tif"), tiff.getvalue())
    write(str(tmp_path / "root" / "b.jpg"), jpeg_bytes())
    made = report._thumb_block(str(tmp_path / "root"), ["a.tif", "b.jpg"], str(tmp_path / "thumbs"), 10**7)
    assert made == [False, True]
    assert os.listdir(tmp_path / "thumbs") == [report.thumb_name("b.jpg")]


@pytest.mark.parametrize("options, message", [
    (dict(features_dir="x", data_dir="y"), "--features-dir .* or --data-dir .*, not both"),
    (dict(folds=1), "--folds must be an integer of at least 2"),
    (dict(near_threshold=1.5), r"--near-threshold must be in \(0, 1\]"),
    (dict(top_k=0), "--top-k must be a positive number"),
])
def test_invalid_audit_options_are_refused_naming_them(options, message):
    with pytest.raises(ConfigError, match=message):
        AuditConfig(**options)


def test_the_inverted_file_index_finds_the_near_copies_the_exact_search_finds(ray_cluster):
    from pipeline.audit.neighbours import nearest

    rng = np.random.default_rng(3)
    centres = np.abs(rng.normal(size=(40, 64)))
    x = np.abs(centres[rng.integers(0, 40, size=3000)] + rng.normal(scale=0.8, size=(3000, 64)))
    copies = rng.choice(3000, size=30, replace=False)
    x[copies[15:]] = x[copies[:15]] + rng.normal(scale=0.05, size=(15, 64))
    x[-8:] = x[-9]  # nine identical photos: more ties than neighbours asked for, wherever each one ranks itself
    x = normalise(x)
    exact, approximate = nearest(x, 5), nearest(x, 5, flat_limit=100)
    for sims, ids in (exact, approximate):
        assert ids.shape == sims.shape == (3000, 5)
        assert (ids[copies[15:], 0] == copies[:15]).all() and (ids[copies[:15], 0] == copies[15:]).all()
        assert (ids != np.arange(3000)[:, None]).all(), "a photo is never its own neighbour"
        assert set(ids[-9:].ravel().tolist()) <= set(range(2991, 3000)) and np.allclose(sims[-9:], 1, atol=1e-5)
    assert np.allclose(exact[0][copies, 0], approximate[0][copies, 0], atol=1e-5)


def _plant(clean_root: str, root: str) -> dict[str, list]:
    """A copy of ``clean_root`` with the planted problems; what was planted (relpaths)."""
    shutil.copytree(clean_root, root, copy_function=shutil.copy2)
    rng = np.random.default_rng(0)
    copies = []
    for i, src in enumerate(COPIED):
        split, cls, name = src.split("/")
        dst = f"{'validation' if split == 'train' else 'train'}/{cls}/{name[:-4]}.copy.jpg"
        write_copy(os.path.join(root, src), os.path.join(root, dst), EDITS[i % len(EDITS)], rng)
        copies.append(frozenset((src, dst)))
    flipped = [flip(root, rel, CLASSES) for rel in FLIPPED]
    planted_strays = [os.path.relpath(write_strays(os.path.join(root, folder), 1, rng, prefix=f"stray{i}")[0], root)
                      for i, folder in enumerate(STRAYS)]
    return {"copies": copies, "flipped": flipped, "strays": planted_strays}


@pytest.fixture(scope="module")
def corpora(ray_cluster, tmp_path_factory):
    """Features (224 px, the real weights, float32) of 60 real photos, and of the same photos with
    planted problems (extracted incrementally from a copy of the first)."""
    base = tmp_path_factory.mktemp("audit")
    clean_root = make_real_root(str(base / "clean"), PER_CLASS)
    clean = run_extraction(ExtractConfig(data_dir=clean_root, output_dir=str(base / "clean_features"),
                                         precision="float32", batch_size=8))
    truth = _plant(clean_root, str(base / "planted"))
    shutil.copytree(clean["output_dir"], str(base / "planted_features"))
    planted = run_extraction(ExtractConfig(data_dir=str(base / "planted"), output_dir=str(base / "planted_features"),
                                           precision="float32", batch_size=8))
    return {"base": base, "clean": clean, "planted": planted, "truth": truth}


def _audit(features: dict, output_dir, **options) -> dict:
    return audit_data(AuditConfig(features_dir=features["output_dir"], output_dir=str(output_dir), **options))


@pytest.fixture(scope="module")
def planted_audit(corpora):
    return _audit(corpora["planted"], corpora["base"] / "planted_audit")


def _scores(audit: dict) -> dict[str, dict]:
    return {row["path"]: row for row in pq.read_table(os.path.join(audit["output_dir"], "scores.parquet")).to_pylist()}


def _leakage(audit: dict) -> set[frozenset]:
    rows = pq.read_table(os.path.join(audit["output_dir"], "pairs.parquet")).to_pylist()
    return {frozenset((r["path_a"], r["path_b"])) for r in rows if r["leakage"]}


def test_planted_copies_across_splits_are_all_flagged_as_leakage_and_nothing_else(corpora, planted_audit):
    assert planted_audit["counts"]["photos"] == 4 * PER_CLASS + len(COPIED) + len(STRAYS)
    assert _leakage(planted_audit) == set(corpora["truth"]["copies"])
    scores = _scores(planted_audit)
    held_out_copies = {p for pair in corpora["truth"]["copies"] for p in pair if p.startswith("validation/")}
    assert {p for p, row in scores.items() if row["leaked"]} == held_out_copies


def test_flipped_labels_and_strays_rank_first(corpora, planted_audit):
    scores = _scores(planted_audit)
    by_quality = sorted(scores, key=lambda p: scores[p]["label_quality"])
    flipped = set(corpora["truth"]["flipped"])
    # 72 photos: 58 train each fold model, so one flip may hide among the hard photos.
    assert len(flipped & set(by_quality[:2 * len(flipped)])) >= len(flipped) - 1, by_quality[:6]
    assert sum(scores[p]["label_issue"] for p in flipped) >= len(flipped) - 1
    assert all(scores[p]["suggested_class"] != scores[p]["class_name"] for p in flipped)
    by_stray = sorted(scores, key=lambda p: -scores[p]["stray_score"])
    assert set(by_stray[:len(STRAYS)]) == set(corpora["truth"]["strays"]), by_stray[:6]
    assert {p for p, row in scores.items() if row["stray"]} == set(corpora["truth"]["strays"])


def test_a_clean_corpus_yields_few_findings(corpora, tmp_path):
    counts = _audit(corpora["clean"], tmp_path / "audit")["counts"]
    assert counts["photos"] == 4 * PER_CLASS
    assert counts["near_duplicate_pairs"] == counts["exact_duplicate_pairs"] == counts["leakage_pairs"] == 0
    assert counts["strays"] <= 1 and counts["label_issues"] <= 2, counts


def test_the_outputs_hold_every_photo_and_the_suspects_a_user_can_exclude(corpora, planted_audit):
    out = planted_audit["output_dir"]
    scores = _scores(planted_audit)
    with open(os.path.join(out, "scores.csv"), newline="") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == sorted(scores)
    with open(os.path.join(out, "suspects.txt")) as f:
        listed = f.read().splitlines()
    training_copies = {p for pair in corpora["truth"]["copies"] for p in pair if p.startswith("train/")}
    assert training_copies | set(corpora["truth"]["strays"]) <= set(listed)
    assert set(listed) <= set(scores) and len(listed) == len(set(listed))
    assert planted_audit["suspects"] == listed
    assert [r["source"] for r in planted_audit["leakage_effect"]] == ["cross-validation"]


# Run after the page has loaded: the title says how many images there are and how many loaded.
IMAGE_CHECK = ("<script>window.addEventListener('load', () => { const all = [...document.images]; "
               "document.title = 'images ' + all.length + ' loaded ' + "
               "all.filter(i => i.complete && i.naturalWidth > 0).length; });</script>")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium is not installed: the report's browser test needs it (apt-get install chromium; "
                    ".ci/run installs it when it runs as root)")
    return found


def test_the_report_renders_in_a_browser_with_every_thumbnail_loaded(planted_audit, tmp_path):
    from PIL import Image

    browser = _chromium()
    page = tmp_path / "page"
    shutil.copytree(planted_audit["output_dir"], page)
    text = (page / "report.html").read_text()
    (page / "check.html").write_text(text.replace("</body>", IMAGE_CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=10000", "--dump-dom", (page / "check.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    shown = text.count("<img ")
    assert shown >= 2 * len(COPIED) + len(STRAYS)
    assert f"<title>images {shown} loaded {shown}</title>" in dom, dom[:300]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2000", (page / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1200) and pixels.std() > 20 and (pixels < 128).mean() > 0.05, "a blank page"


def test_the_same_settings_reuse_an_audit_and_others_are_refused_naming_them(corpora, planted_audit):
    again = _audit(corpora["planted"], planted_audit["output_dir"])
    assert again["created_at"] == planted_audit["created_at"]
    with pytest.raises(OutputError, match=r"holds an audit made with other settings.*near_threshold: 0\.935 → 0\.9"):
        _audit(corpora["planted"], planted_audit["output_dir"], near_threshold=0.9)


def _dogs_model(path: str, manifest: dict) -> str:
    """A train_top model file for ``manifest``'s features whose top says "dogs" for every photo."""
    from pipeline.nets import models
    from pipeline.nets.modelfile import save_classifier

    top = models.top_classifier(manifest["feature_shape"], 2)
    kernel, _ = top.get_layer("predictions").get_weights()
    top.get_layer("predictions").set_weights([np.zeros_like(kernel), np.full(1, 5.0, np.float32)])
    model = models.image_classifier(models.feature_extractor(manifest["image_size"], None, manifest["preprocessing"]), top)
    save_classifier(model, path, {"kind": "top", "classes": manifest["classes"], "image_size": manifest["image_size"],
                                  "weights": manifest["weights"], "preprocessing": manifest["preprocessing"]})
    return path


def test_with_a_top_model_the_leakage_effect_is_that_models_accuracy(corpora, planted_audit, tmp_path):
    model = _dogs_model(str(tmp_path / "model.keras"), corpora["planted"])
    audit = _audit(corpora["planted"], tmp_path / "audit", top_model=model)
    scores = [row for row in _scores(planted_audit).values() if row["split"] == "validation"]
    dogs = np.asarray([row["class_name"] == "dogs" for row in scores])
    clean = ~np.asarray([row["leaked"] for row in scores])
    assert audit["leakage_effect"] == [{
        "split": "validation", "photos": len(scores), "leaked": len(COPIED), "source": "top model",
        "accuracy": round(float(dogs.mean()), 4), "accuracy_without_leaked": round(float(dogs[clean].mean()), 4)}]
    assert "from the given top model" in open(os.path.join(audit["output_dir"], "report.html")).read()


def test_a_top_model_of_another_kind_is_refused_before_any_work(tmp_path):
    import json
    import zipfile

    from pipeline.audit.leakage import check_top_model

    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("classifier.json", json.dumps({"kind": "scratch", "classes": ["a", "b"], "image_size": 150}))
    with pytest.raises(DataError, match="is a scratch model; the leakage effect is measured with a train_top model"):
        check_top_model(str(path))


def test_overwrite_redoes_an_audit_and_a_foreign_folder_is_refused(corpora, tmp_path):
    first = _audit(corpora["clean"], tmp_path / "audit", top_k=3)
    written = os.stat(tmp_path / "audit" / "audit.json").st_mtime_ns
    redone = _audit(corpora["clean"], tmp_path / "audit", top_k=3, overwrite=True)
    assert os.stat(tmp_path / "audit" / "audit.json").st_mtime_ns > written and redone["counts"] == first["counts"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(OutputError, match="notes.txt"):
        _audit(corpora["clean"], tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"


def _small_root(root, names: list[str]) -> str:
    for i, rel in enumerate(names):
        write(os.path.join(root, rel), jpeg_bytes(color=(i, 9, 9)))
    return str(root)


@pytest.mark.parametrize("layout", ["splits", "kaggle"])
def test_an_exclusion_file_leaves_its_photos_out_of_the_listing_and_is_recorded(layout, tmp_path, caplog):
    names = ([f"{s}/{c}/{c[:-1]}.{i}.jpg" for s in ("train", "validation") for c in CLASSES for i in range(3)]
             if layout == "splits" else [f"{c[:-1]}.{i}.jpg" for c in CLASSES for i in range(12)])
    root = _small_root(tmp_path / "root", names)
    gone = [names[0], names[4], "train/cats/not-there.jpg"]
    listing = tmp_path / "exclude.txt"
    listing.write_bytes(("\n".join(gone[:2]) + "\r\n\n" + gone[2] + "\n").encode())
    whole = discover(root, layout, 0.5)
    index = discover(root, layout, 0.5, exclude=str(listing))
    assert sorted(index.files.column("relpath").to_pylist()) == sorted(set(names) - set(gone))
    import hashlib

    assert index.excluded == {"file": str(listing), "sha256": hashlib.sha256(listing.read_bytes()).hexdigest(),
                              "listed": 3, "excluded": 2}
    assert whole.excluded is None and whole.fingerprint() != index.fingerprint()
    assert "1 of the 3 paths of --exclude" in caplog.text


def test_an_exclusion_file_that_is_not_text_is_refused_naming_it(tmp_path):
    root = _small_root(tmp_path / "root", [f"{s}/{c}/x.jpg" for s in ("train", "validation") for c in CLASSES])
    (tmp_path / "bad.txt").write_bytes(b"train/cats/\xff.jpg\n")
    with pytest.raises(DataError, match="bad.txt' is not UTF-8 text"):
        discover(root, exclude=str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError, match="--exclude .*missing.txt.* cannot be used"):
        preflight(AuditConfig(exclude=str(tmp_path / "missing.txt")))


def test_run_all_hands_exclude_to_every_stage_that_lists_photos_and_offers_the_audit(tmp_path):
    from pipeline import runall
    from pipeline.config import FinetuneConfig
    from pipeline.data import outputs

    (tmp_path / "x.txt").write_text("train/cats/cat.1.jpg\n")
    cfg = runall.RunAllConfig(data_dir=str(tmp_path), exclude=str(tmp_path / "x.txt"), audit=True, cache_block4=False)
    stages = ("extract_features", "finetune", "train_scratch", "audit_data")
    assert [getattr(cfg.stage_config(s), "exclude") for s in stages] == [cfg.exclude] * 3 + [None]
    with pytest.raises(ConfigError, match="--exclude, add --no-cache-block4"):
        FinetuneConfig(exclude=cfg.exclude)
    (tmp_path / "run" / "audit").mkdir(parents=True)
    (tmp_path / "run" / "audit" / "settings.json").write_text("{}")
    (tmp_path / "run" / "audit" / "report.html").write_text("")
    (tmp_path / "run" / "audit.lock").write_text("")
    (tmp_path / "run" / "report.md").write_text("")
    assert outputs.check(str(tmp_path / "run"), runall.LAYOUT)


def test_a_cleaned_run_all_excludes_the_suspects_and_records_it(corpora, planted_audit, tmp_path):
    import hashlib

    from pipeline.runall import RunAllConfig, run_all

    suspects = os.path.join(planted_audit["output_dir"], "suspects.txt")
    out = tmp_path / "run"
    report_md = run_all(RunAllConfig(data_dir=planted_audit["data_dir"], output_dir=str(out), exclude=suspects,
                                     audit=True, skip="finetune,scratch", top_epochs=1, extract_image_size=32, weights="none",
                                     precision="float32", extract_batch_size=8, top_batch_size=8))
    listed = open(suspects).read().splitlines()
    manifest = __import__("json").load(open(out / "features" / "manifest.json"))
    assert manifest["excluded"] == {"file": suspects, "sha256": hashlib.sha256(open(suspects, "rb").read()).hexdigest(),
                                    "listed": len(listed), "excluded": len(listed)}
    assert manifest["num_images"] == planted_audit["counts"]["photos"] - len(listed)
    audited = {r["path"] for r in pq.read_table(out / "audit" / "scores.parquet").to_pylist()}
    assert audited and not audited & set(listed)
    assert "[report](audit/report.html)" in open(report_md).read()
