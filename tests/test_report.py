"""The HTML report: self-contained (data-URI thumbnails), escaped, rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qks_pipeline.predict.html_page import THUMBNAIL_SIZE, render_html, write_html
from qks_pipeline.predict.tagger import Prediction, rank

LABELS = ["red", "green", "fish & <chips>", "<script>alert(1)</script>", "blue"]
RED = (230, 20, 20)
WINDOW = (1000, 700)


def _predictions(tmp_path: Path) -> tuple[list[Prediction], list[Path]]:
    """Three readable images (one named with characters to escape), one skipped, made-up logits."""
    rng = np.random.default_rng(0)
    files = [
        tmp_path / "red.png",
        tmp_path / "wide 'a&b'.jpg",
        tmp_path / "tall.png",
        tmp_path / "broken.jpg",
    ]
    Image.new("RGB", (300, 200), RED).save(files[0])
    Image.fromarray(rng.integers(0, 255, (120, 500, 3), dtype=np.uint8)).save(files[1])
    Image.new("RGB", (90, 400), (20, 200, 40)).save(files[2])
    files[3].write_bytes(b"not an image")
    out = []
    for f in files[:3]:
        logits = rng.normal(0, 2, len(LABELS)).astype(np.float32)
        top, above, scores = rank(LABELS, logits, 3, 0.5)
        out.append(Prediction(str(f), LABELS, scores, logits, top, above))
    out.append(
        Prediction(
            str(files[3]), LABELS, None, None, [], [], skipped="corrupt (cannot identify image)"
        )
    )
    return out, files


class _Cards(HTMLParser):
    """Collects, per <figure data-image>, the text of its label spans, plus every <img src>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cards: dict[str, list[str]] = {}
        self.sources: list[str] = []
        self._card: str | None = None
        self._in_label = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "figure":
            self._card = a["data-image"]
            self.cards[self._card] = []
        elif tag == "img":
            self.sources.append(a["src"] or "")
        elif tag == "span" and a.get("class") == "label":
            self._in_label = True

    def handle_endtag(self, tag: str) -> None:
        self._in_label = self._in_label and tag != "span"

    def handle_data(self, data: str) -> None:
        if self._in_label and self._card is not None:
            self.cards[self._card].append(data)


def _parse(html: str) -> _Cards:
    parser = _Cards()
    parser.feed(html)
    return parser


def test_page_is_self_contained_and_escaped(tmp_path):
    predictions, files = _predictions(tmp_path)
    html = write_html(
        tmp_path / "r.html", predictions, threshold=0.5, subtitle="checkpoint <x>"
    ).read_text()
    assert not re.search(r"(https?:)?//[a-z]", html.replace("file://", ""))  # no external reference
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "fish &amp; &lt;chips&gt;" in html and "checkpoint &lt;x&gt;" in html
    page = _parse(html)
    assert list(page.cards) == [p.image for p in predictions]  # unescaped names round-trip
    for p in predictions[:3]:
        assert page.cards[p.image] == [label for label, _ in p.top]
        assert all(f"{score:.3f}" in html for _, score in p.top)
    assert page.cards[predictions[3].image] == [] and "corrupt (cannot identify image)" in html
    assert len(page.sources) == 3
    for src, f in zip(page.sources, files, strict=False):
        assert src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        w, h = Image.open(f).size
        assert thumb.format == "JPEG" and max(thumb.size) == min(THUMBNAIL_SIZE, max(w, h))
        assert abs(thumb.size[0] / thumb.size[1] - w / h) < 0.05  # aspect ratio kept


def test_sources_may_be_in_memory_images(tmp_path):
    predictions, _ = _predictions(tmp_path)
    blue = Image.new("RGBA", (40, 40), (0, 0, 255, 255))
    html = render_html(predictions[:1], threshold=0.5, sources=[blue])
    thumb = Image.open(io.BytesIO(base64.b64decode(_parse(html).sources[0].split(",", 1)[1])))
    assert (
        thumb.size == (40, 40)
        and np.abs(np.subtract(thumb.getpixel((20, 20)), (0, 0, 255))).max() < 10
    )


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install -y chromium chromium-driver)",
)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run(
        [CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90, check=True
    )


@needs_chromium
def test_chromium_renders_every_image_and_its_tags(tmp_path):
    predictions, _ = _predictions(tmp_path)
    page = write_html(tmp_path / "report.html", predictions, threshold=0.5)
    dom = _chromium(tmp_path, "--dump-dom", page.resolve().as_uri()).stdout
    rendered = _parse(dom)
    assert list(rendered.cards) == [p.image for p in predictions]
    for p in predictions[:3]:
        assert rendered.cards[p.image] == [label for label, _ in p.top]
    assert len(rendered.sources) == 3 and all(
        s.startswith("data:image/jpeg;base64,") for s in rendered.sources
    )
    assert "corrupt (cannot identify image)" in dom


@needs_chromium
def test_chromium_screenshot_shows_the_thumbnails(tmp_path):
    predictions, _ = _predictions(tmp_path)
    page = write_html(tmp_path / "report.html", predictions, threshold=0.5)
    shot = tmp_path / "shot.png"
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    _chromium(tmp_path, size, "--hide-scrollbars", f"--screenshot={shot}", page.resolve().as_uri())
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)  # (H, W, 3)
    assert img.shape == (WINDOW[1], WINDOW[0], 3)
    assert img.reshape(-1, 3).var(axis=0).sum() > 0  # not blank
    red = np.abs(img - np.array(RED)).max(axis=-1) < 30  # the red thumbnail decoded and painted
    assert red.sum() > 50 * 50
