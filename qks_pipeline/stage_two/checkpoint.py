"""A trained head on disk: one directory, written by `qks train` (and `qks import-checkpoint`), read
by `qks evaluate` and `qks predict`. Its files: docs/design.md, section 6.

Stage two never loads CLIP: `backbone_args` only names the backbone files for predict to load.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from qks_pipeline.atomic import atomic_write
from qks_pipeline.config import ModelConfig
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.model import QKS
from qks_pipeline.store.fingerprint import describe_backbone, differing_keys
from qks_pipeline.weights_files import load_safetensors

CONFIG = "config.json"  # the model's settings, inputs and selection (`make_config`)
BEST = "best.safetensors"  # the selected weights
LAST = "last.safetensors"  # the last epoch's weights
STATE = "last_state.pt"  # the resume point: optimizer, scheduler, scaler, progress
LOG = "train_log.csv"  # one row per epoch
CLIP_WEIGHTS = "clip_weights.pt"  # an imported authors' checkpoint's CLIP weights
NOT_A_CHECKPOINT = "not found; is this a `qks train` output directory?"


def make_config(
    model: QKS,
    num_tokens: int,
    fingerprint: dict[str, Any],
    backbone_source: dict[str, str] | None,
    *,
    selection: str,
    selection_note: str,
    label_names: list[str] | None = None,
    num_seen: int | None = None,
    label_embedding: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    train_cache: str | None = None,
    source: str | None = None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json, the one schema (docs/design.md, section 6).

    `selection_note` says in words what selected the checkpoint; `inputs` what a resumed training
    run must read again (`stage_two.train.inputs_identity`).
    """
    token_dim, embed_dim = model.proj.shape
    return {
        "model": asdict(model.cfg),
        "token_dim": int(token_dim),
        "num_tokens": int(num_tokens),
        "embed_dim": int(embed_dim),
        "fingerprint": fingerprint,
        "backbone_source": backbone_source,
        "label_names": label_names,
        "num_seen": num_seen,
        "label_embedding": label_embedding,
        "train": train,
        "selection": selection,
        "selection_note": selection_note,
        "train_cache": train_cache,
        "inputs": inputs,
        "source": source,
        "best": None,
    }


def write_config(directory: Path, config: dict[str, Any]) -> None:
    """Write config.json into `directory`, whole or not at all."""
    atomic_write(directory / CONFIG, json.dumps(config, indent=2) + "\n")


def save_weights(model: QKS, path: Path) -> None:
    """The model's weights as safetensors at `path`, whole or not at all."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, safetensors.torch.save(tensors))


def read_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, refused in one line when missing or broken.

    A config without a backbone fingerprint is not a `qks train` config: refused too.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise QKSError("checkpoint directory not found", directory)
    path = directory / CONFIG
    if not path.is_file():
        raise QKSError(NOT_A_CHECKPOINT, path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QKSError(f"not valid JSON ({e})", path) from None
    if not isinstance(config, dict) or not isinstance(config.get("fingerprint"), dict):
        raise QKSError("has no backbone 'fingerprint'; not a `qks train` config", path)
    return config


def load(directory: str | Path, device: torch.device) -> tuple[QKS, dict[str, Any]]:
    """The best weights, in eval mode on `device`, and the config of a checkpoint directory."""
    config = read_config(directory)
    weights = Path(directory) / BEST
    if not weights.is_file():
        raise QKSError(NOT_A_CHECKPOINT, weights)
    cfg = ModelConfig(**config["model"])
    model = QKS(cfg, config["token_dim"], config["embed_dim"])
    state = load_safetensors(weights, "the checkpoint's weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise QKSError(
            f"weights do not fit {CONFIG}: {' '.join(str(e).split())}", weights
        ) from None
    return model.to(device).eval(), config


def backbone_args(
    directory: Path, config: dict[str, Any], model: str | None, pretrained: str | None
) -> tuple[str, str]:
    """The (model, pretrained) of `load_backbone` that rebuild the checkpoint's backbone.

    The ones given, else the source it records when those files still exist (their hashes are
    checked after loading, `check_backbone`), else an exported `clip_weights.pt` beside it;
    otherwise one line naming the flag to pass.
    """
    fp = config["fingerprint"]
    source = config.get("backbone_source") or {}
    where = directory / CONFIG
    if model is None:
        model = source.get("model") or fp["model"]
        if fp.get("model_config_sha256") and not Path(model).is_file():
            what = f"model config {fp['model']}.json (sha256 {fp['model_config_sha256'][:12]})"
            raise QKSError(
                f"the backbone's {what} is not at {model!r}; give its path with --model", where
            )
    if pretrained is None:
        recorded = source.get("pretrained")
        tag = fp.get("pretrained")
        # an open_clip tag (open_clip finds or downloads the file), or None: seeded random weights
        if tag != "file":
            pretrained = str(tag or "none")
        elif recorded and Path(recorded).is_file():
            pretrained = recorded
        elif (directory / CLIP_WEIGHTS).is_file():
            pretrained = str(directory / CLIP_WEIGHTS)
        else:
            what = f"weights file (sha256 {str(fp.get('weights_sha256'))[:12]})"
            raise QKSError(
                f"the backbone's {what} is not at {recorded!r}; give its path with --pretrained",
                where,
            )
    return model, pretrained


def check_backbone(directory: Path, expected: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Refuse a backbone other than the checkpoint's, naming both and the flags that fix it."""
    if diffs := [key for key, _, _ in differing_keys(expected, loaded)]:
        raise QKSError(
            f"backbone mismatch: the checkpoint was trained on {describe_backbone(expected)}, "
            f"but the loaded backbone is {describe_backbone(loaded)} "
            f"(differs in {', '.join(diffs)}); give the original with --model / --pretrained",
            directory / CONFIG,
        )
