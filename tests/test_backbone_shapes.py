"""Backbones of other shapes than ViT-B/16 run the whole pipeline with the default `model` section
(issue 16): extract -> embed-labels -> train -> evaluate -> predict, on tiny configs with
ViT-B/16's, ViT-L/14's and ViT-H/14's traits (width not divisible by 12, patch 14, other image
size). `qks predict` needs no backbone flag: the checkpoint records where the locally saved backbone
is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import embed_args, extract_args, make_tiny_clip, qks, train_args

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
SHAPES = {  # name: (vision width, patch, image size, embed dim, heads `auto` gives)
    "TinyViT-B-16": (64, 16, 64, 32, 1),
    "TinyViT-L-14": (128, 14, 56, 48, 2),  # the width-128 patch-14 backbone of issue 16
    "TinyViT-H-14": (160, 14, 42, 40, 2),  # 1,280 / 12 heads does not divide either
}


def _config(directory: Path, name: str) -> Path:
    width, patch, size, embed, _ = SHAPES[name]
    vision = {
        "image_size": size,
        "layers": 1,
        "width": width,
        "patch_size": patch,
        "head_width": width // 2,
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": embed, "vision_cfg": vision, "text_cfg": TEXT}))
    return path


@pytest.mark.parametrize("name", list(SHAPES))
def test_a_backbone_shape_runs_extract_train_evaluate_predict_with_the_default_model(
    name, sample_dataset, tmp_path
):
    ds = sample_dataset
    width, patch, size, _, heads = SHAPES[name]
    clip = make_tiny_clip(tmp_path / "clip", config=_config(tmp_path, name))
    for split in ("train", "test"):
        qks(*extract_args(ds, clip, tmp_path / f"{split}.zarr", split))
    qks(*embed_args(ds, clip, tmp_path / "l.zarr"))
    params = tmp_path / "params.yaml"
    # no model section: the default model
    params.write_text("train:\n  epochs: 1\n  batch_size: 8\n")
    qks(*train_args(tmp_path / "train.zarr", tmp_path / "l.zarr", tmp_path / "ckpt", params))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model"]["num_heads"] == heads and config["token_dim"] == width
    # the default
    assert config["num_tokens"] == (size // patch) ** 2 + 1 and config["model"]["num_layers"] == 7
    stores = [
        "--test-cache",
        tmp_path / "test.zarr",
        "--labels",
        tmp_path / "l.zarr",
        "--device",
        "cpu",
    ]
    qks("evaluate", "--checkpoint", tmp_path / "ckpt", *stores, "--out", tmp_path / "metrics.json")
    assert "zsl" in json.loads((tmp_path / "metrics.json").read_text())
    predict = [
        "predict",
        "--checkpoint",
        tmp_path / "ckpt",
        "--labels",
        "red, circle",
        "--device",
        "cpu",
    ]
    out = qks(*predict, "--no-progress", ds.images / "test")
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(records) == 8 and all(len(r["top"]) == 2 for r in records)


def test_num_heads_that_do_not_divide_the_width_are_refused_before_any_work(
    sample_dataset, tmp_path
):
    config = _config(tmp_path, "TinyViT-L-14")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"backbone:\n  model: {config}\n  pretrained: none\nmodel:\n  num_heads: 12\n"
    )
    ds = sample_dataset
    extract = ["extract", "--dataset", ds.dataset, "--split", "train", "--images", ds.images]
    out = qks(*extract, "--out", tmp_path / "train.zarr", "--params", params, expect=1)
    assert out.strip().splitlines() == [
        f"Error: {params}: model.num_heads = 12: must divide 128, the width of backbone.model "
        f"{config} (or be auto)"
    ]
    assert not (tmp_path / "train.zarr").exists()
