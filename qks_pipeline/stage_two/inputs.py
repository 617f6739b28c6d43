"""What a stage-two run reads, checked against each other: feature, label and test stores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qks_pipeline.errors import QKSError
from qks_pipeline.store.features import Cache, open_cache
from qks_pipeline.store.fingerprint import check_fingerprint
from qks_pipeline.store.label_store import LABEL_EMBEDDING, check_label_names, read_label_embeddings


@dataclass
class Inputs:
    """A feature store, the label store and maybe a test store, checked against each other."""

    cache: Cache  # the training store (train) or the test store (evaluate)
    test: Cache | None
    label_names: list[str]  # seen then unseen
    embeddings: np.ndarray  # (C, E) float32
    num_seen: int
    # how the labels were embedded (`LABEL_EMBEDDING`): predict repeats it
    label_embedding: dict[str, Any]
    backbone_source: dict[str, str] | None  # the backbone's files, as embed-labels recorded them

    @property
    def backbone(self) -> dict[str, Any]:
        return self.cache.fingerprint["backbone"]


def check_split(cache: Cache, role: str, any_split: bool) -> None:
    """Refuse training on a test store and evaluating on a training store (stage one's split)."""
    split = cache.fingerprint.get("data", {}).get("split")
    if any_split or split != {"train": "test", "test": "train"}[role]:
        return
    why = (
        "training on it leaks the test set"
        if role == "train"
        else "evaluating on it scores training images"
    )
    raise QKSError(
        f"a {split} store (its fingerprint says split {split!r}): {why}; --any-split overrides",
        cache.path,
    )


def open_inputs(
    path: str | Path,
    labels_path: str | Path,
    test_path: str | Path | None = None,
    *,
    role: str = "train",
    any_split: bool = False,
) -> Inputs:
    """Open the store `path` (role `train` or `test`), the label store and the optional test store.

    Refuses incomplete stores, the wrong split, other backbones, other label lists.
    """
    stores = [open_cache(p) for p in (path, test_path) if p is not None]
    for store, r in zip(stores, (role, "test"), strict=False):
        store.require_complete()
        check_split(store, r, any_split)
    cache = stores[0]
    backbone = {"backbone": cache.fingerprint["backbone"]}
    names, emb, attrs = read_label_embeddings(labels_path)
    check_fingerprint(
        labels_path,
        {"backbone": attrs["fingerprint"]["backbone"]},
        backbone,
        f"label store vs {path}",
    )
    check_label_names(labels_path, names, cache.label_names, f"label store vs {path}")
    for test in stores[1:]:
        check_fingerprint(
            test_path,
            {"backbone": test.fingerprint["backbone"]},
            backbone,
            "test vs training store",
        )
        check_label_names(test_path, test.label_names, cache.label_names, "test vs training store")
        if test.num_seen != cache.num_seen:
            raise QKSError(
                f"{test.num_seen} seen labels, the training store {cache.num_seen}", test_path
            )
    label_embedding = {k: attrs.get(k) for k in (*LABEL_EMBEDDING, "templates")}
    label_embedding["normalize"] = bool(attrs.get("normalize"))
    return Inputs(
        cache=cache,
        test=stores[1] if test_path is not None else None,
        label_names=names,
        embeddings=emb,
        num_seen=cache.num_seen,
        label_embedding=label_embedding,
        backbone_source=attrs.get("backbone_source"),
    )
