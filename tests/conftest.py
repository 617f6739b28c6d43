"""Shared fixtures: a tiny open_clip model saved to a local weights file, and a tiny image dataset.

Both are session-scoped and must be treated as read-only; copy what a test needs to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.tiny import SEEN, UNSEEN, TinyClip, make_tiny_clip

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (240, 220, 20),
}
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "there is a {} in the scene."]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on 2 busy cores they wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> TinyClip:
    """(config_json_path, weights_path) of a tiny randomly initialised (seed 0) open_clip model."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@dataclass(frozen=True)
class SampleDataset:
    dataset: Path  # dataset directory: train.jsonl, test.jsonl, seen.txt, unseen.txt
    images: Path  # image root the manifests' paths are relative to
    templates: Path  # prompt templates, one a line
    seen: list[str]
    unseen: list[str]


def _draw(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """A noisy background with one or two coloured shapes; returns the image and its positives."""
    w, h = size
    img = Image.fromarray(rng.integers(90, 160, (h, w, 3), dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    labels = set()
    for _ in range(int(rng.integers(1, 3))):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(["circle", "square", "triangle"]))
        x, y, r = (
            int(rng.integers(10, w - 10)),
            int(rng.integers(10, h - 10)),
            int(rng.integers(5, 10)),
        )
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        labels |= {colour, shape}
    return img, sorted(labels)


def _write_split(root: Path, dataset: Path, split: str, n: int, rng: np.random.Generator) -> None:
    lines = []
    for i in range(n):
        img, positive = _draw(rng, (int(rng.integers(48, 96)), int(rng.integers(48, 96))))
        rel = f"{split}/img{i:03d}.{'png' if i % 2 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel)
        negative = [label for label in SEEN + UNSEEN if label not in positive]
        lines.append(json.dumps({"image": rel, "positive": positive, "negative": negative}))
    (dataset / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    """24 small PNG/JPEG images of shapes (16 train, 8 test), fully annotated, with a vocabulary."""
    base = tmp_path_factory.mktemp("sample")
    dataset, images = base / "dataset", base / "images"
    dataset.mkdir()
    rng = np.random.default_rng(0)
    _write_split(images, dataset, "train", 16, rng)
    _write_split(images, dataset, "test", 8, rng)
    (dataset / "seen.txt").write_text("\n".join(SEEN) + "\n")
    (dataset / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")
    templates = base / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n")
    return SampleDataset(dataset, images, templates, list(SEEN), list(UNSEEN))
