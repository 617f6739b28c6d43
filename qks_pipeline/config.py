"""Hyperparameters: one dataclass per `params.yaml` section, loaded strictly (an unknown key is an error).

Every default lives here and only here. Paths live on the command line and in `dvc.yaml`, not in these sections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from qks_pipeline.errors import QKSError


@dataclass
class BackboneConfig:
    model: str = "ViT-B-16"  # open_clip model name
    pretrained: str = "openai"  # open_clip pretrained tag, or a path to a local weights file


@dataclass
class ExtractConfig:
    batch_size: int = 32  # images per forward pass
    workers: int = 2  # DataLoader worker processes that decode and preprocess
    shard_size: int = 1024  # images per Zarr shard (one writer per shard, whole-shard writes)
    precision: str = "fp32"  # fp32 (the reference) | fp16 | bf16 autocast (GPU only)
    views: int = 0  # extra augmented views stored per training image (0 = the clean view only)
    shuffle: bool = True  # store images in a seeded random order, so contiguous reads are random batches
    seed: int = 0  # seed of the write-time shuffle and of the augmented views
    cluster: str = ""  # "" = this process; local:N or tcp://HOST:PORT = a dask cluster (qks_pipeline.distributed)


@dataclass
class LabelsConfig:
    normalize: bool = False  # L2-normalise each label's mean text feature (the reference does not)


@dataclass
class ModelConfig:
    num_queries: int = 12  # learnable query tokens (NUS-WIDE 12, Open Images 22)
    num_layers: int = 7  # Q-Former layers (NUS-WIDE 7, Open Images 8)
    num_heads: int = 12  # attention heads
    ff_dim: int = 3072  # feed-forward hidden size
    dropout: float = 0.1  # hidden and attention-probability dropout
    keep_cls: bool = True  # let the queries attend to the CLS token as well as the patch tokens


@dataclass
class TrainConfig:
    epochs: int = 60  # upper bound; early stopping usually ends sooner
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 1e-4
    loss: str = "asl"  # asl (NUS-WIDE) | bce (Open Images) | ranking (the ablation)
    scheduler: str = "plateau"  # plateau (ReduceLROnPlateau, mode max, the reference) | cosine | onecycle | none
    plateau_patience: int = 1  # epochs without improvement before the LR is reduced
    early_stop: int = 5  # stop after this many epochs without improvement (0 = never)
    val_fraction: float = 0.1  # share of training images held out to select the checkpoint
    selection: str = "val"  # val (honest, default) | test (the reference's protocol: selects on the test set)
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    seed: int = 0


@dataclass
class EvaluateConfig:
    top_k: list[int] = field(default_factory=lambda: [3, 5])  # K for P/R/F1@K (NUS-WIDE 3,5; Open Images 10,20)
    batch_size: int = 256


@dataclass
class Params:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


T = TypeVar("T")

# Sections of params.yaml that belong to the DVC pipeline (dataset selection, paths) rather than to the library.
PIPELINE_SECTIONS = {"dataset", "data"}


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise QKSError(f"unknown key(s) in section '{where}': {', '.join(unknown)} (known: {', '.join(known)})")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise QKSError(f"section '{where}.{name}' must be a mapping")
            value = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise QKSError(f"'{where}.{name}' must be true or false, got {value!r}")
        elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif default is not None and not isinstance(value, type(default)):
            raise QKSError(f"'{where}.{name}' must be {type(default).__name__}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def load_params(path: str | Path | None) -> Params:
    """Read `params.yaml` (or return the defaults when `path` is None)."""
    if path is None:
        return Params()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise QKSError("params file not found", path) from None
    except yaml.YAMLError as e:
        raise QKSError(f"not valid YAML: {e}".splitlines()[0], path) from None
    if not isinstance(raw, dict):
        raise QKSError("params file must be a mapping of sections", path)
    raw = {k: v for k, v in raw.items() if k not in PIPELINE_SECTIONS}
    try:
        return _build(Params, raw, "params")
    except QKSError as e:
        raise QKSError(e.message, path) from None
