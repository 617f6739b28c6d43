"""The PNG plots: real images with content, drawn from the CSVs of training and evaluation."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from qks_pipeline.stage_two.plots import plot_per_label_ap, plot_training


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _is_drawn_png(path) -> bool:
    img = np.asarray(Image.open(path).convert("L"))
    # lines and text, not blank
    return img.shape[0] > 200 and img.shape[1] > 400 and (img < 128).mean() > 0.005


def test_training_curves_are_drawn_with_missing_values(tmp_path):
    rows = [
        {
            "epoch": e,
            "loss": 5 - e,
            "lr": 1e-4,
            "val_mAP": 0.1 * e,
            "test_zsl_mAP": "",
            "score": 0.1 * e,
        }
        for e in range(1, 4)
    ]
    _write(tmp_path / "log.csv", rows)
    plot_training(tmp_path / "log.csv", tmp_path / "curves.png")
    assert _is_drawn_png(tmp_path / "curves.png")


def test_per_label_ap_skips_unscored_labels_and_limits_the_bars(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {"label": f"l{i}", "split": "seen" if i < 30 else "unseen", "ap": rng.random()}
        for i in range(100)
    ]
    rows.append({"label": "no negative", "split": "unseen", "ap": ""})
    _write(tmp_path / "ap.csv", rows)
    plot_per_label_ap(tmp_path / "ap.csv", tmp_path / "ap.png", most=10)
    assert _is_drawn_png(tmp_path / "ap.png")
