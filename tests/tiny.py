"""The tiny assets every test shares: a tiny randomly initialised open_clip model saved to a local
weights file (so the real loading code runs) and the toy vocabulary of the sample images."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

TINY_CONFIG = Path(__file__).parent / "assets" / "tiny_clip" / "TinyCLIP-test.json"
SEEN = ["red", "green", "blue", "circle", "square"]
UNSEEN = ["yellow", "triangle"]


class TinyClip(NamedTuple):
    config: Path  # open_clip model-config JSON
    weights: Path  # state_dict file


def make_tiny_clip(directory: Path, seed: int = 0, config: Path = TINY_CONFIG) -> TinyClip:
    """A tiny randomly initialised open_clip model (seeded) saved to `directory`; load it through
    the real path: `load_backbone(str(config), str(weights))`."""
    import open_clip
    import torch

    open_clip.add_model_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(config.stem, pretrained=None)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{config.stem}-seed{seed}.pt"
    torch.save(model.state_dict(), weights)
    return TinyClip(config, weights)


def extract_args(
    data, clip: TinyClip, out: Path, split: str = "train", **settings: object
) -> list[str]:
    """`qks extract` arguments for a tiny model on the CPU, decoding in the main process. `data` has
    `.dataset` and `.images` (a dataset directory and its image root); `settings` are
    `extract.KEY=VALUE` overrides."""
    args = [
        "extract",
        "--dataset",
        data.dataset,
        "--split",
        split,
        "--images",
        data.images,
        "--out",
        out,
    ]
    args += ["--model", clip[0], "--pretrained", clip[1], "--device", "cpu"]
    for key, value in {"workers": 0, **settings}.items():
        args += ["--set", f"extract.{key}={value}"]
    return [str(a) for a in args]


def embed_args(data, clip: TinyClip, out: Path, *settings: str) -> list[str]:
    """`qks embed-labels` arguments for a tiny model on the CPU; `data` has `.dataset` and
    `.templates`; `settings` are `SECTION.KEY=VALUE` overrides."""
    args = ["embed-labels", "--dataset", data.dataset, "--templates", data.templates, "--out", out]
    args += ["--model", clip[0], "--pretrained", clip[1], "--device", "cpu"]
    return [str(a) for a in args + [arg for s in settings for arg in ("--set", s)]]


def train_args(cache, labels, out: Path, params: Path, *extra: object) -> list[str]:
    """`qks train` arguments on the CPU without a progress bar; `extra`: more options."""
    args = ["train", "--train-cache", cache, "--labels", labels, "--out", out, "--params", params]
    return [str(a) for a in [*args, "--device", "cpu", "--no-progress", *extra]]


def qks(*args: object, expect: int = 0) -> str:
    """Run a `qks` command in this process; its exit code must be `expect`; returns its output."""
    from click.testing import CliRunner

    from qks_pipeline.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.output
