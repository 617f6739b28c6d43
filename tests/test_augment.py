"""Augmented views of tiny images: seeded, unlike the clean view, each component as configured."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from qks_pipeline.config import ExtractConfig
from qks_pipeline.stage_one.augmentation import (
    AUGMENTS,
    OPERATIONS,
    augmented_view,
    cutout,
    rand_augment,
    rand_operation,
)
from qks_pipeline.stage_one.extract import ViewMaker, data_fingerprint

SIZE = (32, 32)


def picture(width: int = 48, height: int = 40) -> Image.Image:
    """A 40-200 gradient (so autocontrast and equalize change it) and a bright, lopsided square."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([40 + 160 * x / width, 40 + 160 * y / height, 120 + 0 * x], -1)
    pixels[5:15, 5:12] = 250
    return Image.fromarray(pixels.astype(np.uint8))


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("augment", AUGMENTS)
def test_views_are_seeded(augment):
    def view(seed: int) -> np.ndarray:
        return as_array(
            augmented_view(picture(), np.random.default_rng([seed, 7, 1]), augment, SIZE, "bicubic")
        )

    first = view(0)
    assert first.shape == (*SIZE, 3)
    np.testing.assert_array_equal(first, view(0))
    assert sum(not np.array_equal(first, view(seed)) for seed in range(1, 9)) >= 7


@pytest.mark.parametrize("augment", AUGMENTS)
def test_a_view_differs_from_the_clean_image(augment):
    clean = as_array(picture().resize(SIZE, Image.Resampling.BICUBIC))
    for seed in range(8):
        view = as_array(
            augmented_view(picture(40, 40), np.random.default_rng(seed), augment, SIZE, "bicubic")
        )
        assert np.abs(view - clean).mean() > 1.0, seed


# 224 px: half 112 -> 56 each side + 1
@pytest.mark.parametrize(("factor", "side"), [(0.5, 113), (0.25, 57)])
def test_cutout_area_is_as_configured(factor, side):
    """One rectangle in one colour: `side` x `side` pixels when it does not touch the border,
    clipped when it does."""
    blank = Image.new("RGB", (224, 224), (0, 0, 0))
    areas = []
    for seed in range(300):
        changed = (as_array(cutout(blank, np.random.default_rng(seed), factor)) != 0).any(-1)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        assert changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # a full rectangle
        assert len(rows) <= side and len(cols) <= side
        inside = 0 < rows[0] and rows[-1] < 223 and 0 < cols[0] and cols[-1] < 223
        assert not inside or len(rows) == len(cols) == side
        areas.append(changed.sum())
    assert max(areas) == side * side
    # The centre is uniform over the image, so the mean clipped area has a closed form: E[len]^2 per
    # axis.
    lengths = [min(c + side // 2 + 1, 224) - max(c - side // 2, 0) for c in range(224)]
    assert np.mean(areas) == pytest.approx(np.mean(lengths) ** 2, rel=0.1)


@pytest.mark.parametrize("name", OPERATIONS)
def test_each_rand_augment_operation_changes_the_image_and_keeps_its_size(name):
    img = picture()
    out = rand_operation(img, name, 9, np.random.default_rng(0))
    assert out.size == img.size and out.mode == "RGB"
    assert not np.array_equal(as_array(out), as_array(img))
    np.testing.assert_array_equal(
        as_array(out), as_array(rand_operation(img, name, 9, np.random.default_rng(0)))
    )


def test_rand_augment_applies_each_of_two_draws_with_probability_one_half():
    img = picture()
    unchanged = 0
    for seed in range(400):
        unchanged += np.array_equal(
            as_array(rand_augment(img, np.random.default_rng(seed))), as_array(img)
        )
    assert unchanged / 400 == pytest.approx(0.25, abs=0.07)  # neither of the two operations applied


def test_view_maker_and_the_store_fingerprint_follow_the_setting(tmp_path):
    cfg = {"size": SIZE, "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bicubic"}
    clean = T.Compose([T.Resize(SIZE), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
    views = {a: ViewMaker(clean, cfg, 2, 0, a)(picture(), key=3) for a in AUGMENTS}
    assert views["reference"].shape == (3, 3, *SIZE)
    assert (views["reference"][0] == clean(picture())).all() and (
        views["crop_flip"][0] == views["reference"][0]
    ).all()
    assert (views["reference"][1:] - views["crop_flip"][1:]).abs().mean() > 0.05
    (tmp_path / "train.jsonl").write_text("{}\n")

    def fingerprint(**changes) -> dict:
        extract = dataclasses.replace(ExtractConfig(), **changes)
        return data_fingerprint(tmp_path / "train.jsonl", "train", ["a"], ["b"], extract)

    assert fingerprint(views=1) != fingerprint(views=1, augment="crop_flip")
    # no views: nothing to rebuild
    assert fingerprint(views=0) == fingerprint(views=0, augment="crop_flip")
