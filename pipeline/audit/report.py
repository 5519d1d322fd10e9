"""What the doctor writes: ``scores`` and ``pairs`` (every photo's scores, every duplicate pair) as
Parquet and CSV, ``suspects.txt`` (the top suspects' stored paths, for a user to edit and pass as
``--exclude``) and ``report.html``, one static page with its thumbnails (made in Ray tasks) in ``thumbs/``.
"""

from __future__ import annotations

import hashlib
import html
import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from pipeline import names
from pipeline.data import storage
from pipeline.images.decode import FORMATS, DecodeError, read_bytes

THUMBS = "thumbs"
THUMB_PIXELS = 160
THUMB_BLOCK = 64
REPORT = "report.html"
SUSPECTS = "suspects.txt"
# Members of a duplicate group shown in the page; the scores and pairs tables hold all of them.
GROUP_SHOWN = 6


def thumb_name(path: str) -> str:
    """The thumbnail file of a stored path: a hash of it, so any name becomes a safe file name."""
    return f"{hashlib.sha256(path.encode()).hexdigest()[:24]}.jpg"


def _thumbnail(data: bytes, max_pixels: int) -> bytes:
    from PIL import Image, ImageOps

    # Only the decoder's formats: any other Pillow opens (EPS through Ghostscript, say) is not opened for a page.
    with Image.open(io.BytesIO(data), formats=FORMATS) as im:
        if im.width * im.height > max_pixels:
            raise DecodeError("too large", f"{im.width}x{im.height}")
        im.draft("RGB", (THUMB_PIXELS, THUMB_PIXELS))
        small = ImageOps.exif_transpose(im).convert("RGB")
    small.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=80)
    return out.getvalue()


def _thumb_block(root: str, paths: list[str], folder: str, max_pixels: int) -> list[bool]:
    made = []
    for path in paths:
        try:
            thumbnail = _thumbnail(read_bytes(storage.join(root, path), max_pixels), max_pixels)
        except Exception:  # noqa: BLE001 - a photo gone or unreadable since extraction shows as its path
            made.append(False)
            continue
        storage.write_bytes(storage.join(folder, thumb_name(path)), thumbnail)
        made.append(True)
    return made


def make_thumbnails(root: str, paths: list[str], output_dir: str, max_pixels: int) -> set[str]:
    """Thumbnails of ``paths`` (stored, under the data ``root``) in ``<output_dir>/thumbs``; the paths that got one."""
    paths = list(dict.fromkeys(paths))
    task = ray.remote(_thumb_block).options(num_cpus=1)
    folder, escaped_root = storage.join(output_dir, THUMBS), names.escape(root)
    blocks = [paths[i:i + THUMB_BLOCK] for i in range(0, len(paths), THUMB_BLOCK)]
    done = ray.get([task.remote(escaped_root, block, folder, max_pixels) for block in blocks])
    return {p for block, made in zip(blocks, done) for p, ok in zip(block, made) if ok}


def write_tables(output_dir: str, scores: pa.Table, pairs: pa.Table) -> None:
    """``scores`` and ``pairs`` as Parquet and CSV."""
    for name, table in (("scores", scores), ("pairs", pairs)):
        storage.write_parquet(storage.join(output_dir, f"{name}.parquet"), table)
        storage.write_csv(storage.join(output_dir, f"{name}.csv"), table)


def write_suspects(output_dir: str, paths: list[str]) -> list[str]:
    """``suspects.txt``, one stored path a line; the paths left out because they hold a line break."""
    kept = [p for p in dict.fromkeys(paths) if "\n" not in p and "\r" not in p]
    storage.write_text(storage.join(output_dir, SUSPECTS), "".join(f"{p}\n" for p in kept))
    return [p for p in paths if p not in kept]


@dataclass
class Photo:
    """One photo as a card of the page."""

    path: str
    split: str
    caption: str  # plain text, escaped when written


def _card(photo: Photo, thumbs: set[str]) -> str:
    path = html.escape(photo.path)
    image = (f'<img src="{THUMBS}/{thumb_name(photo.path)}" alt="{path}" loading="eager">' if photo.path in thumbs
             else '<div class="missing">no thumbnail</div>')
    return (f'<figure>{image}<figcaption><b>{html.escape(photo.split)}</b> {html.escape(photo.caption)}'
            f'<br><span class="path">{path}</span></figcaption></figure>')


def section(title: str, note: str, rows: list[list[Photo]], thumbs: set[str], labels: list[str] | None = None) -> str:
    """A section of the page: a heading, a note and one box of photo cards per finding."""
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p><p><i>none found</i></p>"
    items = "".join(f'<div class="finding"><div class="tag">{html.escape(labels[i]) if labels else i + 1}</div>'
                    f'{"".join(_card(p, thumbs) for p in row)}</div>' for i, row in enumerate(rows))
    return f'<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p><div class="items">{items}</div>'


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;background:#fff}h1{margin-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.items{display:flex;flex-wrap:wrap;gap:12px}
.finding{display:flex;flex-wrap:wrap;gap:8px;border:1px solid #ddd;border-radius:4px;padding:6px}
.tag{width:100%;font-size:13px;font-weight:bold;color:#444}figure{margin:0;width:170px}
figure img{max-width:160px;max-height:160px;display:block}figcaption{font-size:12px}.path{color:#666;
word-break:break-all}.missing{width:160px;height:60px;background:#eee;font-size:12px}"""


def counts_table(counts: dict[str, Any]) -> str:
    """A two-column table of named counts."""
    def text(value: Any) -> str:
        return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)

    return "<table>" + "".join(f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td>{html.escape(text(v))}</td></tr>"
                               for k, v in counts.items()) + "</table>"


def effect_table(effect: list[dict[str, Any]]) -> str:
    """The leakage effect, one row per held-out split."""
    head = "<tr><th>split</th><th>photos</th><th>leaked</th><th>accuracy</th><th>without the leaked</th></tr>"
    body = "".join(f"<tr><td>{html.escape(r['split'])}</td><td>{r['photos']}</td><td>{r['leaked']}</td>"
                   f"<td>{_percent(r['accuracy'])}</td><td>{_percent(r['accuracy_without_leaked'])}</td></tr>"
                   for r in effect)
    return f"<table>{head}{body}</table>"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def write_page(output_dir: str, title: str, intro: str, body: list[str]) -> str:
    """``report.html``: the page with its parts (HTML already escaped) in order; its location."""
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
            f"{''.join(body)}</body></html>\n")
    location = storage.join(output_dir, REPORT)
    storage.write_text(location, page)
    return location
