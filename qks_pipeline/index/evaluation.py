"""`qks evaluate --index`: the metrics of `qks evaluate --checkpoint` from a query index, one matrix
product per block of images instead of a head pass per image.

The index holds the store's labels and the checkpoint's config, so it needs only the label store
beside it; another vocabulary or another seen/unseen split of the same images is another label
store. Scores equal the head's up to the float16 rounding of z (`index.precision: fp32`: to 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qks_pipeline.config import EvaluateConfig
from qks_pipeline.devices import resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.index.store import IndexStore, open_index, take_rows
from qks_pipeline.stage_two.evaluate import evaluate_predictions
from qks_pipeline.stage_two.scoring import Predictions
from qks_pipeline.store.fingerprint import check_fingerprint
from qks_pipeline.store.label_store import (
    LABEL_EMBEDDING,
    check_label_embedding,
    check_label_names,
    read_label_embeddings,
)


def check_labels(index: IndexStore, labels_path: str | Path, attrs: dict[str, Any]) -> None:
    """Refuse a label store unfit for the index: another backbone, other labels than the indexed
    store's, seen labels other than the checkpoint's, another template pool."""
    backbone = {"backbone": attrs["fingerprint"]["backbone"]}
    expected = {"backbone": index.store_fingerprint["backbone"]}
    check_fingerprint(labels_path, backbone, expected, "label store vs the index")
    names = list(attrs["labels"])
    check_label_names(labels_path, names, index.label_names, "label store vs the index")
    config = index.checkpoint_config
    if config.get("label_names") is not None:  # None: an imported reference checkpoint
        seen = config["label_names"][: config["num_seen"]]
        what = "seen labels of the index vs its checkpoint"
        check_label_names(labels_path, names[: index.num_seen], seen, what)
    made = {k: attrs.get(k) for k in LABEL_EMBEDDING} | {"normalize": bool(attrs.get("normalize"))}
    check_label_embedding(labels_path, made, config.get("label_embedding"))


def _refuse_train_split(index: IndexStore, any_split: bool) -> None:
    """Refuse an index of a training store (evaluating it scores training images)."""
    split = index.store_fingerprint.get("data", {}).get("split")
    if split == "train" and not any_split:
        message = "an index of a train store: evaluating it scores training images; --any-split"
        raise QKSError(message, index.path)


@torch.no_grad()
def index_predictions(
    index: IndexStore, label_emb: torch.Tensor, rows: np.ndarray | None = None
) -> Predictions:
    """The head's logits (N, C) float32 over `rows` (default: the valid rows), their labels, and
    per label how often each query gave its logit on a positive (C, Q), as `scoring.score_rows`
    gives them."""
    rows = np.flatnonzero(np.asarray(index.valid[:], dtype=bool)) if rows is None else rows
    c, q = label_emb.shape[0], index.num_queries
    pred = Predictions(
        np.empty((len(rows), c), np.float32), np.empty((len(rows), c), np.int8), rows
    )
    pred.query_counts = np.zeros((c, q), np.int64)
    pos = 0
    for picked, logits, query in index.logit_blocks(label_emb, rows, query_index=True):
        block = slice(pos, pos + len(picked))
        pred.scores[block] = logits.cpu().numpy()
        pred.labels[block] = take_rows(index.labels, picked)
        r, col = np.nonzero(pred.labels[block] == 1)  # this block's positives
        counts = np.bincount(col * q + query.cpu().numpy()[r, col], minlength=c * q)
        pred.query_counts += counts.reshape(c, q)
        pos = block.stop
    return pred


def evaluate_index(
    index_path: str | Path,
    labels_path: str | Path,
    out: str | Path,
    *,
    params: EvaluateConfig | None = None,
    per_label: str | Path | None = None,
    query_table: str | Path | None = None,
    device: str = "auto",
    any_split: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate the checkpoint an index was built with, on the index's images, from z alone.

    Args:
        index_path: A query index (`qks index`) of a test store.
        labels_path: A label store (`qks embed-labels`) of the same labels, seen then unseen.
        out, params, per_label, query_table, echo: As `stage_two.evaluate.evaluate` takes them.
        device: Where the products run.
        any_split: Accept an index of a training store.

    Returns:
        The metrics written to `out`, as `qks evaluate --checkpoint` writes them.
    """
    index = open_index(index_path)
    index.require_complete()
    _refuse_train_split(index, any_split)
    _, emb, attrs = read_label_embeddings(labels_path)
    check_labels(index, labels_path, attrs)
    if not np.asarray(index.valid[:], dtype=bool).any():
        raise QKSError("no valid rows to score", index.path)
    label_emb = torch.from_numpy(emb).to(resolve_device(device))
    pred = index_predictions(index, label_emb)
    kwargs = {"params": params, "per_label": per_label, "query_table": query_table, "echo": echo}
    config = index.checkpoint_config
    return evaluate_predictions(pred, config, index.label_names, index.num_seen, out, **kwargs)
