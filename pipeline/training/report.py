"""Evaluation figures, metrics files, training curves and the run report."""

from __future__ import annotations

import csv
import io
from typing import Any

from pipeline.data import storage
from pipeline.training.kinds import kind_of


def write_metrics_csv(history: list[dict[str, Any]], path: str) -> None:
    """One row per epoch (epoch, loss, accuracy, val_loss, val_accuracy, …)."""
    if not history:
        storage.write_text(path, "")
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0].keys()))
    writer.writeheader()
    writer.writerows(history)
    storage.write_text(path, buf.getvalue())


def plot_curves(history: list[dict[str, Any]], path: str, title: str) -> None:
    """Loss and accuracy against epochs, train and validation, as a PNG."""
    # Deferred: choosing the display-less backend at import would impose it on every importer.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [h[key] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def write_report(path: str, stages: list[dict[str, Any]], note: str | None, command: str) -> None:
    """``report.md``: each model's validation results next to the reference article's figures. The best
    epoch's accuracy (the exported model's) flatters, being chosen on the validation photos; the last's does not."""
    lines = ["# Run report", ""]
    if note:
        lines += [f"> **Note:** {note}", ""]
    lines += [f"Command: `{command}`", "",
              "| stage | model | val accuracy (best epoch) | val accuracy (last epoch) | val loss | reference article "
              "| epochs | wall time (s) | images/s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    curves = []
    for st in stages:
        acc, last, loss = (f"{st[key]:.4f}" if st.get(key) is not None else "–"
                           for key in ("accuracy", "last_epoch_accuracy", "loss"))
        kind = kind_of(st["kind"], st.get("cached_block4", False)) if st.get("kind") else None
        lines.append(f"| {st['stage']} | {kind.title if kind else '–'} | {acc} | {last} | {loss} | "
                     f"{kind.reference if kind else '–'} | {st.get('epochs', '–')} | "
                     f"{st.get('wall_s', st['seconds']):.1f} | {st.get('images_per_s', 0):.1f} |")
        if st.get("curves"):
            curves += [f"## {kind.title}", "", f"![curves]({st['curves']})", ""]
    storage.write_text(path, "\n".join([*lines, "", *curves]))
