"""A self-contained HTML page of predictions: a card per image with its thumbnail, labels, scores.

Thumbnails are embedded as base64 JPEG data URIs and the styles inline; a Content-Security-Policy
forbids every other source, so the page opens offline and never touches the network. All text is
HTML-escaped.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from html import escape
from pathlib import Path

from PIL import Image

from qks_pipeline.atomic import atomic_write
from qks_pipeline.data.images import BadImage, load_rgb, to_rgb
from qks_pipeline.predict.tagger import ImageInput, Prediction

# longest side of an embedded thumbnail, pixels
THUMBNAIL_SIZE = 256
JPEG_QUALITY = 85
TITLE = "QKS predictions"

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; background: #f4f5f7; color: #1d2330; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: #555; margin: 0 0 16px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 16px; }
.card { margin: 0; background: #fff; border-radius: 8px; box-shadow: 0 1px 3px #0002; \
overflow: hidden; }
.thumb { display: flex; align-items: center; justify-content: center; height: 200px; \
background: #e8eaee; }
.thumb img { max-width: 100%; max-height: 200px; }
.thumb.none { color: #a33; font-weight: 600; }
figcaption { padding: 8px 12px 12px; }
.name { font-weight: 600; word-break: break-all; margin-bottom: 6px; }
.reason { color: #a33; margin: 0; }
ol.tags { list-style: none; margin: 0; padding: 0; }
.tag { position: relative; display: flex; justify-content: space-between; padding: 2px 6px; \
margin: 2px 0; }
.tag .bar { position: absolute; left: 0; top: 0; bottom: 0; background: #dfe6f3; z-index: 0; }
.tag.above .bar { background: #b9e0c2; }
.tag .label, .tag .score { position: relative; z-index: 1; }
.tag.above .label { font-weight: 600; }
.more { color: #555; font-size: 12px; margin: 4px 0 0; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _thumbnail(source: ImageInput) -> str:
    """The thumbnail's <div>: a JPEG data URI within THUMBNAIL_SIZE, or why it cannot be shown."""
    try:
        if isinstance(source, Image.Image):
            thumb = to_rgb(source).copy()
        else:
            thumb = load_rgb(source)
    except BadImage as e:
        return f'<div class="thumb none">{escape(e.reason)}</div>'
    thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=JPEG_QUALITY)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<div class="thumb"><img src="{uri}" alt=""></div>'


def card(p: Prediction, source: ImageInput, threshold: float) -> str:
    """One image's <figure>: thumbnail, name, top labels (those above the threshold highlighted)."""
    name = f'<div class="name">{escape(p.image)}</div>'
    if p.skipped is not None:
        reason = f'<p class="reason">{escape(p.skipped)}</p>'
        body = f'<div class="thumb none">skipped</div><figcaption>{name}{reason}</figcaption>'
        return f'<figure class="card skipped" data-image="{escape(p.image)}">{body}</figure>'
    items = []
    for label, score in p.top:
        cls = "tag above" if score > threshold else "tag"
        bar = f'<span class="bar" style="width:{100 * score:.1f}%"></span>'
        text = f'<span class="label">{escape(label)}</span><span class="score">{score:.3f}</span>'
        items.append(f'<li class="{cls}">{bar}{text}</li>')
    shown = {label for label, _ in p.top}
    extra = [label for label, _ in p.above if label not in shown]
    more = ""
    if extra:
        more = f'<p class="more">also above {threshold:g}: {escape(", ".join(extra))}</p>'
    caption = f'<figcaption>{name}<ol class="tags">{"".join(items)}</ol>{more}</figcaption>'
    figure = f'<figure class="card" data-image="{escape(p.image)}">'
    return f"{figure}{_thumbnail(source)}{caption}</figure>"


def render_html(
    predictions: Sequence[Prediction],
    *,
    threshold: float,
    sources: Sequence[ImageInput] | None = None,
    subtitle: str = "",
) -> str:
    """The page of `Tagger.predict`'s predictions.

    Args:
        predictions: what `Tagger.predict` returned.
        threshold: labels scored above it are highlighted.
        sources: the images (paths or PIL images) aligned with `predictions`, for the thumbnails;
            default: each prediction's path.
        subtitle: one line shown under the title.
    """
    if sources is None:
        sources = [Path(p.image) for p in predictions]
    skipped = sum(p.skipped is not None for p in predictions)
    labels = predictions[0].labels if predictions else []
    meta = (
        f"{len(predictions)} images ({skipped} skipped), {len(labels)} labels, "
        f"threshold {threshold:g}"
    )
    pairs = zip(predictions, sources, strict=True)
    cards = "\n".join(card(p, source, threshold) for p, source in pairs)
    intro = (
        f'<p class="meta">{escape(subtitle + "; " if subtitle else "")}{escape(meta)}</p>\n'
        f'<details class="meta"><summary>labels</summary>{escape(", ".join(labels))}</details>'
    )
    return html_document(TITLE, intro, cards)


def html_document(title: str, intro: str, cards: str, css: str = CSS) -> str:
    """A self-contained page: `title` (HTML, escaped by the caller), the `intro` lines under it,
    then the grid of `cards`."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1>{title}</h1>
{intro}
<main class="grid">
{cards}
</main>
</body>
</html>
"""


def write_html(
    path: str | Path,
    predictions: Sequence[Prediction],
    *,
    threshold: float,
    sources: Sequence[ImageInput] | None = None,
    subtitle: str = "",
) -> Path:
    """Write `render_html`'s page to `path` (atomically); returns the path."""
    page = render_html(predictions, threshold=threshold, sources=sources, subtitle=subtitle)
    atomic_write(path, page)
    return Path(path)
