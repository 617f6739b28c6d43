"""Stage two, evaluation: score a test cache with a trained QKS head (or CLIP zero-shot) and apply the protocol.

Scores cover the seen labels followed by the unseen labels, over the valid rows of the test store. Metrics come from
`metrics.evaluate_scores` and are fractions in [0, 1]. The query-preference analysis counts, for each label, which query
token gives the label's logit on its positive images (the paper's "knowledge sharing" inspection).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from qks_pipeline.atomic import atomic_write
from qks_pipeline.cache import Cache, check_fingerprint, open_cache, read_label_embeddings
from qks_pipeline.config import EvaluateConfig, ModelConfig
from qks_pipeline.devices import autocast, resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.loader import CacheLoader, open_loader
from qks_pipeline.metrics import evaluate_scores
from qks_pipeline.model import QKS

UNITS = "fraction"  # every metric written here is a fraction in [0, 1]
CLIP_BASELINE = "clip_zero_shot"


def check_label_names(path: str | Path, found: list[str], expected: list[str], what: str) -> None:
    """Refuse a label list that is not the expected one, naming the first difference."""
    if found == expected:
        return
    i = next(
        (i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b), min(len(found), len(expected))
    )
    a = found[i] if i < len(found) else "<end>"
    b = expected[i] if i < len(expected) else "<end>"
    raise QKSError(f"{what}: label {i} is {a!r}, {b!r} expected ({len(found)} labels vs {len(expected)})", path)


@dataclass
class Predictions:
    scores: np.ndarray  # (N, C) float32 over the valid rows, in store order
    labels: np.ndarray  # (N, C) int8
    rows: np.ndarray  # (N,) store rows
    query_index: np.ndarray | None = None  # (N, C) int16: the query that gave each logit


@torch.no_grad()
def predict(
    score_fn: Callable[[torch.Tensor], Any], loader: CacheLoader, device: torch.device, query_index: bool = False
) -> Predictions:
    """Run `score_fn(tokens (B, T, D) on device)` -> logits (B, C) [, query index (B, C)] over one in-order pass."""
    scores, labels, rows, index = [], [], [], []
    for batch in loader.epoch(0):
        out = score_fn(batch.tokens.to(device, non_blocking=True))
        logits, qi = out if query_index else (out, None)
        scores.append(logits.float().cpu().numpy())
        labels.append(batch.labels.numpy())
        rows.append(batch.rows)
        if qi is not None:
            index.append(qi.to(torch.int16).cpu().numpy())
    if not rows:
        raise QKSError(f"no valid rows to score in rows {loader.row_range[0]}-{loader.row_range[1]}")
    cat = np.concatenate
    return Predictions(cat(scores), cat(labels), cat(rows), cat(index) if index else None)


def model_scorer(model: QKS, label_emb: torch.Tensor, device: torch.device, amp: bool, query_index: bool = False):
    """A `score_fn` for `predict`: the model in eval mode under autocast."""
    model.eval()

    def score(tokens: torch.Tensor):
        with autocast(device, amp):
            return model(tokens, label_emb, return_query_index=query_index)

    return score


def clip_scorer(visual_proj: torch.Tensor, label_emb: torch.Tensor):
    """CLIP zero-shot: CLS token @ visual_proj, L2-normalised, cosine with the L2-normalised label embeddings."""
    text = torch.nn.functional.normalize(label_emb.float(), dim=-1)  # (C, E)

    def score(tokens: torch.Tensor) -> torch.Tensor:
        image = torch.nn.functional.normalize(tokens[:, 0].float() @ visual_proj, dim=-1)  # (B, D) @ (D, E) -> (B, E)
        return image @ text.T  # (B, C)

    return score


def load_checkpoint(directory: str | Path, device: torch.device) -> tuple[QKS, dict[str, Any]]:
    """The best weights and the run's config.json of a `qks train` (or `qks import-checkpoint`) output directory."""
    directory = Path(directory)
    config_path, weights = directory / "config.json", directory / "best.safetensors"
    for path in (config_path, weights):
        if not path.exists():
            raise QKSError("not found; is this a `qks train` output directory?", path)
    config = json.loads(config_path.read_text())
    model = QKS(ModelConfig(**config["model"]), config["token_dim"], config["embed_dim"])
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as e:
        raise QKSError(f"weights do not fit config.json: {str(e).splitlines()[0]}", weights) from None
    return model.to(device).eval(), config


@dataclass
class TestInputs:
    cache: Cache
    label_names: list[str]
    embeddings: torch.Tensor  # (C, E) float32, seen then unseen
    num_seen: int


def open_test_inputs(test_path: str | Path, labels_path: str | Path, checkpoint: dict[str, Any] | None) -> TestInputs:
    """Open the test cache and label embeddings; refuse mismatched backbones or label lists."""
    cache = open_cache(test_path)
    cache.require_complete()
    names, emb, attrs = read_label_embeddings(labels_path)
    backbone = {"backbone": cache.fingerprint["backbone"]}
    check_fingerprint(labels_path, {"backbone": attrs["fingerprint"]["backbone"]}, backbone, "label embeddings")
    check_label_names(labels_path, names, cache.label_names, "label embeddings vs the test cache")
    if checkpoint is not None:
        check_fingerprint(test_path, backbone, {"backbone": checkpoint["fingerprint"]}, "test cache vs the checkpoint")
    if checkpoint is not None and checkpoint["label_names"] is not None:  # None: an imported reference checkpoint
        seen = cache.label_names[: cache.num_seen]
        check_label_names(test_path, seen, checkpoint["label_names"][: checkpoint["num_seen"]],
                          "seen labels of the test cache vs the checkpoint")  # fmt: skip
    return TestInputs(cache, names, torch.from_numpy(emb), cache.num_seen)


def query_preference(query_index: np.ndarray, labels: np.ndarray, names: list[str], num_seen: int,
                     num_queries: int) -> list[dict[str, Any]]:  # fmt: skip
    """Per label: over its positive images, how often each query gives the label's logit."""
    table = []
    for c, name in enumerate(names):
        pos = labels[:, c] == 1
        counts = np.bincount(query_index[pos, c], minlength=num_queries)  # (N_queries,)
        top = int(counts.argmax())
        row = {"label": name, "split": "seen" if c < num_seen else "unseen", "positives": int(pos.sum())}
        row |= {"top_query": top if pos.any() else "", "top_share": float(counts[top] / pos.sum()) if pos.any() else ""}
        row |= {f"q{q}": int(n) for q, n in enumerate(counts)}
        table.append(row)
    return table


def per_label_table(results: dict[str, dict[str, Any]], labels: np.ndarray, names: list[str],
                    num_seen: int) -> list[dict[str, Any]]:  # fmt: skip
    """label, seen/unseen, AP in its own setting (seen or zsl), AP in gzsl, positives, annotated (test images)."""
    rows = []
    for c, name in enumerate(names):
        own = results["seen" if c < num_seen else "zsl"]["ap"].get(name, float("nan"))
        rows.append({
            "label": name, "split": "seen" if c < num_seen else "unseen", "ap": own,
            "ap_gzsl": results["gzsl"]["ap"].get(name, float("nan")),
            "positives": int((labels[:, c] == 1).sum()), "annotated": int((labels[:, c] != 0).sum()),
        })  # fmt: skip
    return rows


def write_csv(path: str | Path, rows: list[dict[str, Any]], fields: list[str] | None = None) -> None:
    """Rows as CSV with a header (the first row's keys unless `fields`), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields or list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def summary(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The metrics without the per-label APs (those go to the per-label CSV)."""
    return {setting: {k: v for k, v in m.items() if k != "ap"} for setting, m in results.items()}


SELECTED_ON_TEST = "checkpoint selected on the TEST set (reference protocol): test metrics are optimistic"


def _json_safe(obj: Any) -> Any:
    """NaN (an undefined metric) -> null, so the file is strict JSON for DVC."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def format_table(rows: dict[str, dict[str, dict[str, Any]]], top_k: list[int]) -> str:
    """A readable table: one line per (setting, model), metrics in percent."""
    cols = ["mAP"] + [f"{m}@{k}" for k in top_k for m in ("p", "r", "f1")]
    width = max(len(name) for name in rows) + 2
    lines = [f"{'setting':<8}{'model':<{width}}" + "".join(f"{c:>8}" for c in cols) + f"{'images':>9}  (percent)"]
    for setting in ("zsl", "gzsl", "seen"):
        for name, results in rows.items():
            m = results[setting]
            vals = "".join(f"{100 * m[c]:>8.2f}" if m[c] == m[c] else f"{'-':>8}" for c in cols)
            lines.append(f"{setting.upper():<8}{name:<{width}}{vals}{m['num_images']:>9}")
    return "\n".join(lines)


def format_query_preference(table: list[dict[str, Any]], num_queries: int) -> str:
    """How the labels divide among the queries: per query, the labels it wins most often, seen and unseen."""
    lines = [f"query preference ({num_queries} queries): labels whose logit comes most often from each query"]
    for split in ("seen", "unseen"):
        rows = [r for r in table if r["split"] == split and r["positives"] > 0]
        if not rows:
            continue
        counts = np.bincount([r["top_query"] for r in rows], minlength=num_queries)
        share = np.mean([r["top_share"] for r in rows])
        lines.append(f"  {split:<7} " + " ".join(f"q{q}:{n}" for q, n in enumerate(counts))
                     + f"  (top query's mean share of a label's positives {share:.2f})")  # fmt: skip
    return "\n".join(lines)


def _score(score_fn: Callable, loader: CacheLoader, device: torch.device, inputs: TestInputs, top_k: list[int],
           query_index: bool = False) -> tuple[Predictions, dict[str, dict[str, Any]]]:  # fmt: skip
    pred = predict(score_fn, loader, device, query_index=query_index)
    return pred, evaluate_scores(pred.scores, pred.labels, inputs.label_names, inputs.num_seen, top_k)


def evaluate(
    test_path: str | Path,
    labels_path: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    params: EvaluateConfig | None = None,
    per_label: str | Path | None = None,
    query_table: str | Path | None = None,
    baseline: str | None = None,
    device: str = "auto",
    amp: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate a checkpoint and/or the CLIP zero-shot baseline on a test cache; write the metrics JSON and tables.

    Returns:
        The metrics written to `out`: settings zsl/gzsl/seen (fractions), `selection`, and with both a checkpoint and
        `baseline="clip"` the baseline's settings under `clip_zero_shot`.
    """
    if checkpoint is None and baseline is None:
        raise QKSError("nothing to evaluate: give --checkpoint, --baseline clip, or both")
    params = params or EvaluateConfig()
    dev = resolve_device(device)
    model, config = load_checkpoint(checkpoint, dev) if checkpoint is not None else (None, None)
    inputs = open_test_inputs(test_path, labels_path, config)
    loader = open_loader(inputs.cache, batch_size=params.batch_size, shuffle=False)
    emb = inputs.embeddings.to(dev)
    report: dict[str, Any] = {"units": UNITS}
    shown: dict[str, dict[str, Any]] = {}
    if model is not None:
        scorer = model_scorer(model, emb, dev, amp, query_index=True)
        pred, results = _score(scorer, loader, dev, inputs, params.top_k, query_index=True)
        report |= {"model": "qks", "selection": config.get("selection", "val"), **summary(results)}
        if report["selection"] == "test":
            report["warning"] = SELECTED_ON_TEST
        shown["qks"] = results
        table = query_preference(pred.query_index, pred.labels, inputs.label_names, inputs.num_seen,
                                 model.cfg.num_queries)  # fmt: skip
        write_csv(query_table or Path(out).with_name("query_preference.csv"), table)
    if baseline is not None:
        proj = torch.from_numpy(inputs.cache.group["visual_proj"][:]).to(dev)  # (D, E)
        pred_b, results_b = _score(clip_scorer(proj, emb), loader, dev, inputs, params.top_k)
        if model is None:
            pred, results = pred_b, results_b
            report |= {"model": CLIP_BASELINE, "selection": "none", **summary(results_b)}
        else:
            report[CLIP_BASELINE] = summary(results_b)
        shown["clip zero-shot"] = results_b
    if per_label is not None:
        write_csv(per_label, per_label_table(results, pred.labels, inputs.label_names, inputs.num_seen))
    atomic_write(out, json.dumps(_json_safe(report), indent=2) + "\n")
    echo(format_table(shown, params.top_k))
    if model is not None:
        echo(format_query_preference(table, model.cfg.num_queries))
    if report.get("warning"):
        echo(f"WARNING: {SELECTED_ON_TEST}")
    echo(f"metrics written to {out}")
    return report
