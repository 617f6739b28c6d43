"""The gallery of a search (`qks search --html`): one self-contained page, the images found best
first, each with its thumbnail, its search score (and each label's) and its top tags.

It is `predict.html_page`'s page with a search line above each card: thumbnails as data URIs,
inline styles, a Content-Security-Policy that forbids every other source, all text escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

from qks_pipeline.atomic import atomic_write
from qks_pipeline.index.index import Hit
from qks_pipeline.predict.html_page import CSS, card, html_document
from qks_pipeline.predict.tagger import Prediction

TITLE = "QKS search"
GALLERY_CSS = """
.hit { margin: 0; }
.found { font-weight: 600; margin: 0 0 4px; }
.found .each { color: #555; font-weight: 400; }
"""


def hit_card(rank: int, hit: Hit, tags: Prediction, source: Path | None, threshold: float) -> str:
    """One image found: its rank and scores, then its card (thumbnail, name, top tags)."""
    each = ", ".join(f"{label} {score:.3f}" for label, score in hit.scores.items())
    found = f'#{rank} score {hit.score:.3f} <span class="each">({escape(each)})</span>'
    shown = card(tags, source if source is not None else Path(hit.image), threshold)
    return f'<section class="hit"><p class="found">{found}</p>{shown}</section>'


def render_gallery(
    labels: Sequence[str],
    hits: Sequence[Hit],
    tags: Sequence[Prediction],
    *,
    images: Path | None,
    threshold: float = 0.5,
    subtitle: str = "",
) -> str:
    """The page of `Index.search`'s hits for `labels`, with each hit's tags (aligned with `hits`);
    thumbnails from `images` (the image root; None: no thumbnails)."""
    sources = [images / hit.image if images is not None else None for hit in hits]
    cards = "\n".join(
        hit_card(rank, hit, p, source, threshold)
        for rank, (hit, p, source) in enumerate(zip(hits, tags, sources, strict=True), 1)
    )
    asked = " AND ".join(labels)
    meta = f"{len(hits)} best images for {asked}: the lowest of the labels' scores"
    intro = f'<p class="meta">{escape(subtitle + "; " if subtitle else "")}{escape(meta)}</p>'
    return html_document(f"{TITLE}: {escape(asked)}", intro, cards, css=CSS + GALLERY_CSS)


def write_gallery(path: str | Path, *args, **kwargs) -> Path:
    """Write `render_gallery(*args, **kwargs)` to `path` (atomically); returns the path."""
    atomic_write(path, render_gallery(*args, **kwargs))
    return Path(path)
