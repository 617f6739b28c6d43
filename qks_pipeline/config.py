"""Hyperparameters: one dataclass per `params.yaml` section, loaded strictly (an unknown key is an
error).

Every default lives here and only here. Paths live on the command line and in `dvc.yaml`, not in
these sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from qks_pipeline.errors import QKSError


@dataclass
class BackboneConfig:
    model: str = "ViT-B-16"  # open_clip model name, or a path to a model config (.json)
    pretrained: str = "openai"  # open_clip pretrained tag, or a path to a local weights file

    def vision_width(self) -> int | None:
        """The vision tower's width from the model's config alone (nothing loaded); None when it
        cannot be read."""
        # open_clip (and torch under it) load only when an explicit num_heads needs the width
        import open_clip

        try:
            if self.model.endswith(".json"):
                cfg = json.loads(Path(self.model).read_text())
            else:
                cfg = open_clip.get_model_config(self.model)
            return int(cfg["vision_cfg"]["width"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass
class ExtractConfig:
    batch_size: int = 32  # images per forward pass
    workers: int = 2  # DataLoader worker processes that decode and preprocess
    shard_size: int = 1024  # images per Zarr shard (one writer per shard, whole-shard writes)
    # fp32: the reference; fp16 | bf16 autocast (GPU only)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    views: int = 0  # extra augmented views stored per training image (0 = the clean view only)
    # how views are drawn (qks_pipeline.stage_one.augmentation)
    augment: Literal["reference", "crop_flip"] = "reference"
    # store images in a seeded random order, so contiguous reads are random batches
    shuffle: bool = True
    seed: int = 0  # seed of the write-time shuffle and of the augmented views
    # "" = this process; local:N or tcp://HOST:PORT = a dask cluster
    # (qks_pipeline.stage_one.cluster)
    cluster: str = ""
    # larger images are masked as decompression bombs (Pillow's default limit)
    max_pixels: int = 89_478_485


@dataclass
class LabelsConfig:
    normalize: bool = False  # L2-normalise each label's mean text feature (the reference does not)


@dataclass
class ModelConfig:
    num_queries: int = 12  # learnable query tokens (NUS-WIDE 12, Open Images 22)
    num_layers: int = 7  # Q-Former layers (NUS-WIDE 7, Open Images 8)
    # attention heads; auto: width / 64 (BERT's and CLIP's head width)
    num_heads: int | Literal["auto"] = "auto"
    ff_dim: int = 3072  # feed-forward hidden size
    dropout: float = 0.1  # hidden and attention-probability dropout
    keep_cls: bool = True  # let the queries attend to the CLS token as well as the patch tokens

    def heads(self, width: int) -> int:
        """The number of heads for a Q-Former `width` wide; an explicit one must divide it."""
        if self.num_heads == "auto":  # width / 64, or the nearest divisor below it
            return next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)
        if self.num_heads < 1 or width % self.num_heads:
            raise QKSError(
                f"model.num_heads {self.num_heads} does not divide the backbone's width {width} (use auto)"
            )
        return self.num_heads


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64  # the global batch: with nproc N ranks, each takes batch_size / N of it
    lr: float = 1e-5
    weight_decay: float = 1e-4
    # asl (NUS-WIDE) | bce (Open Images); masl, mbce leave unknown labels out; ranking (the
    # ablation); asl_focus_grad: ASL with gradients through its focusing weight (not the
    # reference's)
    loss: Literal["asl", "masl", "bce", "mbce", "ranking", "asl_focus_grad"] = "asl"
    # plateau: the reference's (mode max)
    scheduler: Literal["plateau", "cosine", "onecycle", "none"] = "plateau"
    plateau_patience: int = 1  # epochs without improvement before the LR is reduced
    # stop after this many epochs without improvement (0 = never, the reference)
    early_stop: int = 0
    val_fraction: float = 0.1  # share of training images held out to select the checkpoint
    # val (honest) | test (the reference's protocol: selects on the test set)
    selection: Literal["val", "test"] = "val"
    # fp32: the reference; bf16 | fp16 autocast (GPU only)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # data-parallel processes on this machine (qks_pipeline/stage_two/data_parallel.py)
    nproc: int = 1
    seed: int = 0


@dataclass
class EvaluateConfig:
    # K for P/R/F1@K (NUS-WIDE 3,5; Open Images 10,20)
    top_k: list[int] = field(default_factory=lambda: [3, 5])
    batch_size: int = 256
    # standard: labels need a positive and a negative, ties grouped | reference: the authors' AP/F1
    # (see metrics.py)
    protocol: Literal["standard", "reference"] = "standard"
    # CLIP baseline: the reference's one template | the pool mean
    clip_labels: Literal["template", "pool"] = "template"


@dataclass
class IndexConfig:
    # dtype of the stored query outputs z: fp16 halves the index (scores move by float16 rounding)
    precision: Literal["fp16", "fp32"] = "fp16"
    batch_size: int = 64  # images per head pass while building
    # most labels one tag/search/serve call embeds (each with the whole prompt pool)
    max_labels: int = 4096


@dataclass
class Params:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        """An explicit `model.num_heads` that does not divide the backbone's width is refused here,
        before any work."""
        if self.model.num_heads != "auto":
            if width := self.backbone.vision_width():
                self.model.heads(width)


T = TypeVar("T")

# Sections of params.yaml that belong to the DVC pipeline (dataset selection, paths) rather than to
# the library.
PIPELINE_SECTIONS = {"dataset", "data"}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against a field's type hint (bool, int, float, str, list[...], Literal[...],
    unions of them, or a dataclass: a section, a mapping of its fields)."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise QKSError(f"section '{where}' must be a mapping")
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise QKSError(f"'{where}' must be one of {' | '.join(map(str, args))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where)
            except QKSError:
                pass
        names = " or ".join(" | ".join(map(str, typing.get_args(a))) or a.__name__ for a in args)
        raise QKSError(f"'{where}' must be {names}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise QKSError(f"'{where}' must be a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if hint is float and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            return float(value)  # also YAML 1.1's strings such as 3e-5
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        expected = "true or false" if hint is bool else hint.__name__
        raise QKSError(f"'{where}' must be {expected}, got {value!r}")
    return value


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise QKSError(
            f"unknown key(s) in section '{where}': {', '.join(unknown)} (known: {', '.join(hints)})"
        )
    return cls(
        **{name: _coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    )


def _parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`SECTION.KEY=VALUE` strings as nested sections; VALUE is read as YAML (numbers, true/false,
    [lists])."""
    raw: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (sep and dot and section and name):
            raise QKSError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-5")
        try:
            raw.setdefault(section, {})[name] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise QKSError(f"--set {item!r}: the value is not valid YAML") from None
    return raw


def load_params(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """The hyperparameters of a run: the defaults, updated by a params file, then by overrides.

    Args:
        path: a params.yaml (one section per stage; `dataset` and `data` belong to the DVC
            pipeline and are ignored here), or None for the defaults.
        overrides: `SECTION.KEY=VALUE` strings, as `--set` takes them; VALUE is read as YAML.

    Returns:
        The checked `Params`; an unknown key or a value of the wrong type is a `QKSError`.
    """
    raw = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise QKSError("params file not found", path) from None
        except yaml.YAMLError as e:
            raise QKSError(f"not valid YAML: {e}".splitlines()[0], path) from None
        if not isinstance(raw, dict):
            raise QKSError("params file must be a mapping of sections", path)
        raw = {k: v for k, v in raw.items() if k not in PIPELINE_SECTIONS}
    sets = _parse_overrides(overrides)
    # each checked alone, so that an error names its source
    for values, source in ((raw, path), (sets, "--set")):
        try:
            _build(Params, values, "params")
        except QKSError as e:
            raise QKSError(e.message, source) from None
    for section, values in sets.items():
        raw[section] = {**raw.get(section, {}), **values}
    return _build(Params, raw, "params")
