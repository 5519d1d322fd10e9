"""The doctor's outputs assembled from its findings: the tables, ``suspects.txt``, the thumbnails
of every photo the page shows, and the page itself (sections built by ``pipeline.audit.report``)."""

from __future__ import annotations

import html
import logging
from typing import Any

from pipeline.audit import findings as found
from pipeline.audit import report
from pipeline.audit.findings import Findings
from pipeline.audit.pooled import Corpus
from pipeline.config import AuditConfig

log = logging.getLogger(__name__)


def _effect_note(source: str, folds: int) -> str:
    if source == "top model":
        return "from the given top model, run on the stored features of each held-out photo"
    return (f"from the cross-validation probabilities (no --top-model given): each photo's from the fold model "
            f"that did not see it, while its copy in the training split was among that model's training photos "
            f"{folds - 1} times out of {folds}, so the effect is understated")


def _photo(corpus: Corpus, row: int, caption: str = "") -> report.Photo:
    return report.Photo(path=str(corpus.paths[row]), split=str(corpus.splits[row]),
                        caption=caption or corpus.classes[corpus.labels[row]])


def _sections(corpus: Corpus, f: Findings, top_k: int) -> list[tuple[str, str, list[list[report.Photo]], list[str]]]:
    """(title, note, rows of photos, row labels) of each section, leakage first."""
    leaks = found.leakage_pairs(f)[:top_k]
    groups = found.duplicate_groups(corpus, f)[:top_k]
    wrong = found.label_suspects(f)[:top_k]
    strays = found.stray_suspects(f)[:top_k]
    classes = corpus.classes
    return [
        ("Leakage: duplicates across splits", "The same photo (or an edited copy) in two splits; a held-out photo "
         "whose copy is trained on inflates that split's accuracy. Most similar first.",
         [[_photo(corpus, f.dups.a[p]), _photo(corpus, f.dups.b[p])] for p in leaks],
         [f"similarity {f.dups.similarity[p]:.4f}" + (" (same file bytes)" if f.dups.exact[p] else "") for p in leaks]),
        ("Duplicate groups", f"Photos joined by exact copies or near duplicates; groups across splits first, at most "
         f"{report.GROUP_SHOWN} photos of each shown (pairs.csv has every pair).",
         [[_photo(corpus, m) for m in g[:report.GROUP_SHOWN]] for g in groups],
         [f"{len(g)} photos" for g in groups]),
        ("Likely wrong labels", "Flagged by confident learning over out-of-sample probabilities; lowest label quality "
         "(the probability of the given label) first.",
         [[_photo(corpus, r, f"given {classes[corpus.labels[r]]} → suggested {classes[f.labels.suggested[r]]}")]
          for r in wrong], [f"label quality {f.labels.quality[r]:.4f}" for r in wrong]),
        ("Strays", "Photos far from every class in feature space; most out of place first.",
         [[_photo(corpus, r)] for r in strays], [f"stray score {f.strays.score[r]:.3f}" for r in strays]),
    ]


def write_outputs(cfg: AuditConfig, output_dir: str, corpus: Corpus, f: Findings) -> dict[str, Any]:
    """Write every output file; what ``audit.json`` records of them (the page, the suspects)."""
    report.write_tables(output_dir, found.scores_table(corpus, f), f.dups.table(corpus))
    suspects = found.suspects(corpus, f, cfg.top_k)
    left_out = report.write_suspects(output_dir, suspects)
    if left_out:
        log.warning(f"{len(left_out)} suspects hold a line break in their name and are not in suspects.txt: {left_out[:3]}")
    sections = _sections(corpus, f, cfg.top_k)
    shown = [p.path for _, _, rows, _ in sections for row in rows for p in row]
    thumbs = report.make_thumbnails(corpus.root, shown, output_dir, cfg.max_pixels)
    source = f.effect[0]["source"] if f.effect else "cross-validation"
    body = [report.counts_table(found.summary_counts(corpus, f) | {"near-duplicate cut-off": cfg.near_threshold}),
            "<h2>Effect of leakage on accuracy</h2>",
            f"<p>{html.escape('Accuracy of each held-out split with and without its leaked photos, ' + _effect_note(source, cfg.folds))}.</p>",
            report.effect_table(f.effect)]
    body += [report.section(title, note, rows, thumbs, labels) for title, note, rows, labels in sections]
    body.append(f"<p>Every photo's scores: scores.parquet, scores.csv; every duplicate pair: pairs.parquet, pairs.csv; "
                f"the top suspects' paths, to edit and pass as --exclude: {report.SUSPECTS}.</p>")
    intro = (f"{len(corpus)} photos of the data root {corpus.root} (features: VGG16 at "
             f"{corpus.manifest['image_size']} px, {corpus.manifest['weights']['source']} weights).")
    page = report.write_page(output_dir, "Data set audit", intro, body)
    return {"report": page, "suspects": suspects, "thumbnails": len(thumbs)}
