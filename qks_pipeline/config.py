"""Hyperparameters: one dataclass per `params.yaml` section, loaded strictly (an unknown key is an
error, and so is a value outside its field's bound).

Every default lives here and only here, with the range its values must lie in (`bounded`): one
check (`check_bound`) serves params.yaml and `--set` alike. Paths live on the command line and in
`dvc.yaml`, not in these sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from qks_pipeline.errors import QKSError


@dataclass(frozen=True)
class Bound:
    """The range a number must lie in (each item, for a list): `low` and `high` included unless
    open; None: no limit on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and self.low_open)):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.high_open)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"in {left}{self.low}, {self.high}{right}"


AT_LEAST_1 = Bound(low=1)
AT_LEAST_0 = Bound(low=0)
POSITIVE = Bound(low=0, low_open=True)
FRACTION = Bound(low=0, high=1, high_open=True)
# numpy's and torch's seeds both take these
SEED = Bound(low=0, high=2**32 - 1)


def bounded(default: Any, bound: Bound) -> Any:
    """A field whose values `check_bound` keeps in `bound` (a list: every item, and not empty)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"bound": bound})
    return field(default=default, metadata={"bound": bound})


def check_bound(key: str, value: Any, bound: Bound | None) -> None:
    """Refuse, in one line naming `key`, a value outside `bound`.

    Every float must also be finite, and every list non-empty; text and choices are the type
    check's (`_coerce`).
    """
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise QKSError(f"{key} = []: must be a non-empty list of numbers {bound}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        finite = not isinstance(item, float) or math.isfinite(item)
        if finite and (bound is None or bound.allows(item)):
            continue
        allowed = ["finite"] if isinstance(item, float) else []
        allowed += [str(bound)] if bound is not None else []
        each = "each item " if isinstance(value, list) else ""
        raise QKSError(f"{key} = {value!r}: {each}must be {' and '.join(allowed)}")


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
    batch_size: int = bounded(32, AT_LEAST_1)  # images per forward pass
    # DataLoader worker processes that decode and preprocess
    workers: int = bounded(2, AT_LEAST_0)
    # images per Zarr shard (one writer per shard, whole-shard writes)
    shard_size: int = bounded(1024, AT_LEAST_1)
    # fp32: the reference; fp16 | bf16 autocast (GPU only)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # extra augmented views stored per training image (0 = the clean view only)
    views: int = bounded(0, AT_LEAST_0)
    # how views are drawn (qks_pipeline.stage_one.augmentation)
    augment: Literal["reference", "crop_flip"] = "reference"
    # store images in a seeded random order, so contiguous reads are random batches
    shuffle: bool = True
    seed: int = bounded(0, SEED)  # seed of the write-time shuffle and of the augmented views
    # "" = this process; local:N or tcp://HOST:PORT = a dask cluster
    # (qks_pipeline.stage_one.cluster)
    cluster: str = ""
    # larger images are masked as decompression bombs (Pillow's default limit)
    max_pixels: int = bounded(89_478_485, AT_LEAST_1)


@dataclass
class LabelsConfig:
    normalize: bool = False  # L2-normalise each label's mean text feature (the reference does not)


@dataclass
class ModelConfig:
    # learnable query tokens (NUS-WIDE 12, Open Images 22)
    num_queries: int = bounded(12, AT_LEAST_1)
    num_layers: int = bounded(7, AT_LEAST_1)  # Q-Former layers (NUS-WIDE 7, Open Images 8)
    # attention heads; auto: width / 64 (BERT's and CLIP's head width)
    num_heads: int | Literal["auto"] = bounded("auto", AT_LEAST_1)
    ff_dim: int = bounded(3072, AT_LEAST_1)  # feed-forward hidden size
    dropout: float = bounded(0.1, FRACTION)  # hidden and attention-probability dropout
    keep_cls: bool = True  # let the queries attend to the CLS token as well as the patch tokens

    def heads(self, width: int) -> int:
        """The number of heads for a Q-Former `width` wide; an explicit one must divide it."""
        if self.num_heads == "auto":  # width / 64, or the nearest divisor below it
            return next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)
        if self.num_heads < 1 or width % self.num_heads:
            raise QKSError(
                f"model.num_heads = {self.num_heads}: must divide the backbone's width {width} "
                "(or be auto)"
            )
        return self.num_heads


@dataclass
class TrainConfig:
    epochs: int = bounded(60, AT_LEAST_1)
    # the global batch: with nproc N ranks, each takes batch_size / N of it
    batch_size: int = bounded(64, AT_LEAST_1)
    lr: float = bounded(1e-5, POSITIVE)
    weight_decay: float = bounded(1e-4, AT_LEAST_0)
    # asl (NUS-WIDE) | bce (Open Images); masl, mbce leave unknown labels out; ranking (the
    # ablation); asl_focus_grad: ASL with gradients through its focusing weight (not the
    # reference's)
    loss: Literal["asl", "masl", "bce", "mbce", "ranking", "asl_focus_grad"] = "asl"
    # plateau: the reference's (mode max)
    scheduler: Literal["plateau", "cosine", "onecycle", "none"] = "plateau"
    # epochs without improvement before the LR is reduced
    plateau_patience: int = bounded(1, AT_LEAST_0)
    # stop after this many epochs without improvement (0 = never, the reference)
    early_stop: int = bounded(0, AT_LEAST_0)
    # share of training images held out to select the checkpoint
    val_fraction: float = bounded(0.1, FRACTION)
    # val (honest) | test (the reference's protocol: selects on the test set)
    selection: Literal["val", "test"] = "val"
    # fp32: the reference; bf16 | fp16 autocast (GPU only)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # data-parallel processes on this machine (qks_pipeline/stage_two/data_parallel.py)
    nproc: int = bounded(1, AT_LEAST_1)
    seed: int = bounded(0, SEED)


@dataclass
class EvaluateConfig:
    # K for P/R/F1@K (NUS-WIDE 3,5; Open Images 10,20)
    top_k: list[int] = bounded([3, 5], AT_LEAST_1)
    batch_size: int = bounded(256, AT_LEAST_1)
    # standard: labels need a positive and a negative, ties grouped | reference: the authors' AP/F1
    # (see metrics.py)
    protocol: Literal["standard", "reference"] = "standard"
    # CLIP baseline: the reference's one template | the pool mean
    clip_labels: Literal["template", "pool"] = "template"


@dataclass
class IndexConfig:
    # dtype of the stored query outputs z: fp16 halves the index (scores move by float16 rounding)
    precision: Literal["fp16", "fp32"] = "fp16"
    batch_size: int = bounded(64, AT_LEAST_1)  # images per head pass while building
    # most labels one tag/search/serve call embeds (each with the whole prompt pool)
    max_labels: int = bounded(4096, AT_LEAST_1)


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
        """An explicit `model.num_heads` that does not divide the width of this run's backbone is
        refused here, before any work."""
        heads = self.model.num_heads
        if heads != "auto" and (width := self.backbone.vision_width()) and width % heads:
            raise QKSError(
                f"model.num_heads = {heads}: must divide {width}, the width of backbone.model "
                f"{self.backbone.model} (or be auto)"
            )


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


def _refuse_unknown(values: dict[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        what = f"key(s) in section '{where}'" if where else "section(s)"
        raise QKSError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """A section (or `Params`: `where` "") from a mapping: known keys, of their types, in bounds."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _refuse_unknown(values, list(fields), where)
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        checked[name] = _coerce(value, hints[name], key)
        check_bound(key, checked[name], fields[name].metadata.get("bound"))
    return cls(**checked)


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


def _read_params_file(path: str | Path) -> dict[str, Any]:
    """The library's sections of a params file: UTF-8 YAML, a mapping, not empty."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise QKSError("params file not found", path) from None
    except UnicodeDecodeError as e:
        raise QKSError(f"params file is not UTF-8 text (byte {e.start})", path) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise QKSError(f"not valid YAML: {e}".splitlines()[0], path) from None
    if raw is None:
        raise QKSError("params file is empty (leave out --params for the defaults)", path)
    if not isinstance(raw, dict):
        raise QKSError("params file must be a mapping of sections", path)
    return {k: v for k, v in raw.items() if k not in PIPELINE_SECTIONS}


def _check_sections(values: dict[str, Any]) -> None:
    """Each section of one source alone (keys, types, bounds), so that an error names its source;
    the checks across sections (`Params.__post_init__`) wait for the merged values."""
    hints = typing.get_type_hints(Params)
    _refuse_unknown(values, list(hints), "")
    for name, section in values.items():
        _coerce(section, hints[name], name)


def load_params(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """The hyperparameters of a run: the defaults, updated by a params file, then by overrides.

    Args:
        path: a params.yaml (one section per stage; `dataset` and `data` belong to the DVC
            pipeline and are ignored here), or None for the defaults. An empty file is refused.
        overrides: `SECTION.KEY=VALUE` strings, as `--set` takes them; VALUE is read as YAML.

    Returns:
        The checked `Params`; an unknown key, a value of the wrong type or outside its field's
        bound is a `QKSError` naming its source. Checks across sections (`model.num_heads` against
        the backbone's width) use the merged values: the backbone this run will use.
    """
    raw = _read_params_file(path) if path is not None else {}
    sets = _parse_overrides(overrides)
    for values, source in ((raw, path), (sets, "--set")):
        try:
            _check_sections(values)
        except QKSError as e:
            raise QKSError(e.message, source) from None
    for section, values in sets.items():
        raw[section] = {**raw.get(section, {}), **values}
    try:
        return _build(Params, raw, "")
    # only the check across sections is left: named by where model.num_heads was set
    except QKSError as e:
        source = "--set" if "num_heads" in sets.get("model", {}) else path
        raise QKSError(e.message, source) from None
