"""Stage two, evaluation: score a test store with a QKS head or CLIP zero-shot; apply the protocol.

Scores: the seen then the unseen labels over the test store's valid rows, in float32
(`qks_pipeline.stage_two.scoring`); metrics: `metrics.evaluate_scores` under `evaluate.protocol`
(docs/design.md, section 4), fractions in [0, 1]. The CLIP baseline (section 1) scores against one
template's label embeddings (`evaluate.clip_labels: template`, the reference's `clip_eval.py`) or
the prompt pool's (`pool`). The query-preference table counts, per label, which query gives its
logit on its positive images (the paper's "knowledge sharing"). Memory (section 3): 5 bytes per
image and label.

Outputs, written all or none: the metrics JSON holds the paper's table numbers only (per setting
ZSL and GZSL: mAP and P/R/F1@K), so `dvc metrics show` stays readable; everything else (the seen
setting, counts, protocol, selection, notes, the baseline's template) goes to its details file
beside it (`<stem>_details.json`); the per-label CSV and its plot; the query-preference CSV.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qks_pipeline.atomic import atomic_write, write_csv
from qks_pipeline.config import EvaluateConfig
from qks_pipeline.devices import resolve_device
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.checkpoint import load as load_checkpoint
from qks_pipeline.stage_two.inputs import Inputs, open_inputs
from qks_pipeline.stage_two.loader import CacheLoader, open_loader
from qks_pipeline.stage_two.metrics import (
    SELECTED_ON_TEST,
    SETTINGS,
    evaluate_scores,
    reference_scores,
)
from qks_pipeline.stage_two.model import QKS
from qks_pipeline.stage_two.plots import plot_per_label_ap
from qks_pipeline.stage_two.scoring import Predictions, clip_scorer, model_scorer, score_rows
from qks_pipeline.store.fingerprint import check_fingerprint
from qks_pipeline.store.label_store import (
    CLIP_EMBEDDINGS,
    check_label_embedding,
    check_label_names,
    read_label_embeddings,
)

CLIP_BASELINE = "clip_zero_shot"
# the query-preference table's default name: the metrics JSON's stem + this
QUERY_TABLE = ".query_preference.csv"
# the details file's name: the metrics JSON's stem + this
DETAILS = "_details.json"
# the settings of the paper's tables, whose numbers the metrics JSON holds
TABLE_SETTINGS = ("zsl", "gzsl")


def check_checkpoint(
    inputs: Inputs, config: dict[str, Any], test_path: str | Path, labels_path: str | Path
) -> None:
    """Refuse a test or label store unfit for the checkpoint: backbone, seen labels, templates."""
    check_fingerprint(
        test_path,
        {"backbone": inputs.backbone},
        {"backbone": config["fingerprint"]},
        "vs checkpoint",
    )
    # None: an imported reference checkpoint
    if config.get("label_names") is not None:
        seen = inputs.label_names[: inputs.num_seen]
        trained = config["label_names"][: config["num_seen"]]
        what = "seen labels of the test store vs the checkpoint"
        check_label_names(test_path, seen, trained, what)
    check_label_embedding(labels_path, inputs.label_embedding, config.get("label_embedding"))


def query_preference(counts: np.ndarray, names: list[str], num_seen: int) -> list[dict[str, Any]]:
    """Per label: over its positive images, how often each query gives its logit; counts (C, Q)."""
    table = []
    for c, (name, n) in enumerate(zip(names, counts, strict=True)):
        top = int(n.argmax())
        total = int(n.sum())
        row = {"label": name, "split": "seen" if c < num_seen else "unseen", "positives": total}
        row["top_query"] = top if total else ""
        row["top_share"] = n[top] / total if total else ""
        row |= {f"q{q}": int(k) for q, k in enumerate(n)}
        table.append(row)
    return table


def per_label_table(
    results: dict[str, dict[str, Any]], names: list[str], num_seen: int
) -> list[dict[str, Any]]:
    """Per label: AP in its own setting (seen or zsl) and in gzsl, and what it lacks there.

    What a label lacks to be scored in a setting: nothing, a positive, a negative or an annotation.
    Its positives and negatives count among its own setting's images.
    """
    gzsl = results["gzsl"]
    rows = []
    for c, name in enumerate(names):
        seen = c < num_seen
        own = results["seen"] if seen else results["zsl"]
        i = c if seen else c - num_seen  # the label's column in its own setting
        row = {"label": name, "split": "seen" if seen else "unseen", "ap": own["ap"][i]}
        row |= {"ap_gzsl": gzsl["ap"][c], "lacks": own["lacks"][i], "lacks_gzsl": gzsl["lacks"][c]}
        row |= {"positives": own["positives"][i], "negatives": own["negatives"][i]}
        rows.append(row)
    return rows


# per-label arrays of a setting: the CSV's, not the JSON's
PER_LABEL = ("ap", "lacks", "positives", "negatives")


def summary(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The metrics without the per-label arrays; NaN (undefined) as None: strict JSON for DVC."""
    return {
        s: {k: None if v != v else v for k, v in m.items() if k not in PER_LABEL}
        for s, m in results.items()
    }


def label_warning(
    results: dict[str, dict[str, Any]], protocol: str, per_label: str | Path | None
) -> str | None:
    """One line when labels lack a positive or a negative among the images that annotate them."""
    counts = {
        s: (m["labels_without_positive"], m["labels_without_negative"]) for s, m in results.items()
    }
    if not any(sum(c) for c in counts.values()):
        return None
    how = (
        "counted as the reference does (AP 0 / AP 1)"
        if protocol == "reference"
        else "left out of every mAP"
    )
    where = f"named in {per_label}" if per_label else "named in the --per-label CSV"
    shown = ", ".join(f"{s.upper()} {p}/{n}" for s, (p, n) in counts.items())
    return f"labels without a positive / without a negative: {shown}; {how}; {where}"


def format_table(rows: dict[str, dict[str, dict[str, Any]]], top_k: list[int]) -> str:
    """A readable table: one line per (setting, model), metrics in percent."""
    cols = ["mAP"] + [f"{m}@{k}" for k in top_k for m in ("p", "r", "f1")]
    width = max(len(name) for name in rows) + 2
    header = "".join(f"{c:>8}" for c in cols)
    lines = [f"{'setting':<8}{'model':<{width}}{header}{'images':>9}  (percent)"]
    for setting in SETTINGS:
        for name, results in rows.items():
            m = results[setting]
            vals = "".join(f"{100 * m[c]:>8.2f}" if m[c] == m[c] else f"{'-':>8}" for c in cols)
            lines.append(f"{setting.upper():<8}{name:<{width}}{vals}{m['num_images']:>9}")
    return "\n".join(lines)


def format_query_preference(table: list[dict[str, Any]], num_queries: int) -> str:
    """How the labels divide among the queries: per query, the seen and unseen labels it wins."""
    lines = [
        f"query preference ({num_queries} queries): "
        "labels whose logit comes most often from each query"
    ]
    for split in ("seen", "unseen"):
        rows = [r for r in table if r["split"] == split and r["positives"] > 0]
        if rows:
            counts = np.bincount([r["top_query"] for r in rows], minlength=num_queries)
            share = np.mean([r["top_share"] for r in rows])
            wins = " ".join(f"q{q}:{n}" for q, n in enumerate(counts))
            mean_share = f"top query's mean share of a label's positives {share:.2f}"
            lines.append(f"  {split:<7} {wins}  ({mean_share})")
    return "\n".join(lines)


def _head(
    model: QKS, inputs: Inputs, loader: CacheLoader, device: torch.device, protocol: str
) -> tuple[Predictions, list[dict[str, Any]]]:
    """The head's predictions (sigmoids under the reference protocol) and query-preference table."""
    label_emb = torch.from_numpy(inputs.embeddings).to(device)
    scorer = model_scorer(model, label_emb, query_index=True)
    pred = score_rows(scorer, loader, device, model.cfg.num_queries)
    return pred, _preference(pred, inputs.label_names, inputs.num_seen, protocol)


def _preference(
    pred: Predictions, names: list[str], num_seen: int, protocol: str
) -> list[dict[str, Any]]:
    """The query-preference table of a head's predictions; under the reference protocol their
    scores become fp32 sigmoids, in place (the reference ranks them)."""
    table = query_preference(pred.query_counts, names, num_seen)
    if protocol == "reference":
        reference_scores(pred.scores)
    return table


def _clip(
    inputs: Inputs, labels_path: str | Path, clip_labels: str, device: torch.device
) -> tuple[str, Callable]:
    """The CLIP baseline's label embeddings in words, and its scorer."""
    if clip_labels == "template":
        _, emb, attrs = read_label_embeddings(labels_path, CLIP_EMBEDDINGS)
        template = attrs["clip_template"]
        how = f"one template, {template!r}, L2-normalised (the reference's clip_eval.py)"
    else:
        emb = inputs.embeddings
        how = f"the {inputs.label_embedding['num_templates']}-template pool's mean"
    proj = torch.from_numpy(inputs.cache.visual_proj[:]).to(device)  # (D, E)
    return how, clip_scorer(proj, torch.from_numpy(emb).to(device))


def _head_report(config: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's entries for the head: its metrics and what chose the checkpoint."""
    selection = {k: config.get(k) for k in ("selection", "selection_note")}
    report = {"model": "qks", **selection, **summary(results)}
    if report["selection"] == "test":
        report["warning"] = SELECTED_ON_TEST
    return report


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
    any_split: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate a checkpoint and/or the CLIP zero-shot baseline on a test store.

    Writes the metrics JSON `out` (the paper's table numbers), its details file beside it
    (`<stem>_details.json`: the rest of the returned report) and the tables, all or none; echoes
    the metrics as a table.

    Args:
        test_path: The test feature store (stage one).
        labels_path: The label-embedding store (stage one).
        out: Where the metrics JSON goes.
        checkpoint: A `qks train` (or `qks import-checkpoint`) output directory; None scores the
            baseline alone.
        params: The `evaluate` section of params.yaml (default: its defaults).
        per_label: Where a CSV per label goes (AP, what it lacks to be scored, positives,
            negatives), and its plot beside it (.png); None writes neither.
        query_table: Where the query-preference CSV goes (with a checkpoint only); default: beside
            `out`, named `<out's stem>.query_preference.csv`.
        baseline: "clip" scores CLIP zero-shot too (or alone, without a checkpoint).
        device: "auto", "cpu", "cuda" or "cuda:N".
        any_split: Accept even a store that stage one made from a training split.
        echo: Where the table and the warnings are printed.

    Returns:
        The report that `out` and its details file divide (`split_report`): `protocol`, settings
        zsl/gzsl/seen (fractions), `selection`, and with both a checkpoint and `baseline="clip"`
        the baseline's settings and `clip_labels` under `clip_zero_shot`.
    """
    if checkpoint is None and baseline is None:
        raise QKSError("nothing to evaluate: give --checkpoint, --baseline clip, or both")
    params = params or EvaluateConfig()
    dev = resolve_device(device)
    model, config = load_checkpoint(checkpoint, dev) if checkpoint is not None else (None, None)
    inputs = open_inputs(test_path, labels_path, role="test", any_split=any_split)
    if config is not None:
        check_checkpoint(inputs, config, test_path, labels_path)
    pin = dev.type == "cuda"
    loader = open_loader(inputs.cache, batch_size=params.batch_size, shuffle=False, pin_memory=pin)
    metrics = partial(
        evaluate_scores, num_seen=inputs.num_seen, top_k=params.top_k, protocol=params.protocol
    )
    # every metric is in [0, 1]
    report: dict[str, Any] = {"units": "fraction", "protocol": params.protocol}
    shown = {}  # each model's results, as the table shows them
    pred = None
    if model is not None:
        pred, table = _head(model, inputs, loader, dev, params.protocol)
        shown["qks"] = metrics(pred.scores, pred.labels)
        report |= _head_report(config, shown["qks"])
    if baseline is not None:
        how, scorer = _clip(inputs, labels_path, params.clip_labels, dev)
        clip_pred = score_rows(scorer, loader, dev, into=pred)  # the head's arrays, overwritten
        shown["clip zero-shot"] = metrics(clip_pred.scores, clip_pred.labels)
        clip = {"clip_labels": how, **summary(shown["clip zero-shot"])}
        if model is None:
            report |= {"model": CLIP_BASELINE, "selection": "none", **clip}
        else:
            report[CLIP_BASELINE] = clip
    preference = (table, model.cfg.num_queries) if model is not None else None
    outputs = Outputs(out, per_label, query_table if preference else None)
    names = inputs.label_names
    return _write(report, shown, names, inputs.num_seen, outputs, params, preference, echo)


def split_report(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the metrics file's content, the details file's): the paper's table numbers (per setting in
    `TABLE_SETTINGS`: mAP and P/R/F1@K, the baseline's under its own key), and everything else."""
    numbers: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for key, value in report.items():
        if key in TABLE_SETTINGS:
            numbers[key] = {k: v for k, v in value.items() if _in_table(k)}
            details[key] = {k: v for k, v in value.items() if not _in_table(k)}
        elif key == CLIP_BASELINE:
            numbers[key], details[key] = split_report(value)
        else:
            details[key] = value
    return numbers, details


def read_report(out: str | Path) -> dict[str, Any]:
    """The whole report again, from a metrics JSON and its details file (`split_report` undone)."""
    numbers = json.loads(Path(out).read_text())
    details = json.loads(details_path(out).read_text())
    return _merged(details, numbers)


def details_path(out: str | Path) -> Path:
    """The details file beside a metrics JSON: its stem + `DETAILS`."""
    out = Path(out)
    return out.with_name(out.stem + DETAILS)


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    both = {k: _merged(a[k], b[k]) for k in a.keys() & b.keys() if isinstance(a[k], dict)}
    return a | b | both


def _in_table(metric: str) -> bool:
    """mAP, p@K, r@K, f1@K: the paper's numbers (not the counts)."""
    return metric == "mAP" or metric.split("@")[0] in ("p", "r", "f1")


class Outputs:
    """Where evaluation writes: the metrics JSON `out` and its details file beside it, the
    per-label CSV and its plot (with `per_label`), the query-preference CSV (with `query_table`,
    default beside `out`)."""

    def __init__(
        self, out: str | Path, per_label: str | Path | None, query_table: str | Path | None
    ):
        self.out = Path(out)
        self.details = details_path(out)
        self.per_label = None if per_label is None else Path(per_label)
        self.query_table = Path(query_table or self.out.with_name(self.out.stem + QUERY_TABLE))


@contextlib.contextmanager
def all_or_none() -> Iterator[Callable[[Path], Path]]:
    """`stage(path)`: a temporary path to write for `path`. When the block succeeds every one is
    renamed onto its path; when it fails, all are removed and no output changes."""
    staged: dict[Path, Path] = {}

    def stage(path: Path) -> Path:
        staged[path] = path.with_name(f".{path.name}.tmp{os.getpid()}")
        return staged[path]

    try:
        yield stage
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def _write(
    report: dict[str, Any],
    shown: dict[str, dict[str, dict[str, Any]]],
    names: list[str],
    num_seen: int,
    outputs: Outputs,
    params: EvaluateConfig,
    preference: tuple[list[dict[str, Any]], int] | None,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Write every output or none: the metrics JSON and its details, the per-label CSV (of the first
    model shown) and its plot, the query-preference CSV (from `preference`: table, number of
    queries). Then echo the table, the query preference and the warnings. Returns `report`."""
    primary = next(iter(shown.values()))
    numbers, details = split_report(report)
    with all_or_none() as stage:
        if preference is not None:
            write_csv(stage(outputs.query_table), preference[0])
        if outputs.per_label is not None:
            table = stage(outputs.per_label)
            write_csv(table, per_label_table(primary, names, num_seen))
            plot_per_label_ap(table, stage(outputs.per_label.with_suffix(".png")))
        atomic_write(stage(outputs.out), json.dumps(numbers, indent=2) + "\n")
        atomic_write(stage(outputs.details), json.dumps(details, indent=2) + "\n")
    echo(format_table(shown, params.top_k))
    if preference is not None:
        echo(format_query_preference(*preference))
    warnings = [label_warning(primary, params.protocol, outputs.per_label), report.get("warning")]
    for line in filter(None, warnings):
        echo(f"WARNING: {line}")
    echo(f"metrics written to {outputs.out} (details: {outputs.details})")
    return report


def evaluate_predictions(
    pred: Predictions,
    config: dict[str, Any],
    names: list[str],
    num_seen: int,
    out: str | Path,
    *,
    params: EvaluateConfig | None = None,
    per_label: str | Path | None = None,
    query_table: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """What `evaluate` writes and echoes for a checkpoint, from its predictions made elsewhere (the
    query index: `qks_pipeline.index`).

    Args:
        pred: The head's logits, labels and `query_counts` over the valid rows of a test set (the
            logits are overwritten under the reference protocol).
        config: The checkpoint's config.json (its selection).
        names: The labels, seen then unseen; num_seen: how many are seen.
        out, params, per_label, query_table, echo: As `evaluate` takes them.

    Returns:
        The report written to `out` and its details file, as `evaluate` returns it for a
        checkpoint alone.
    """
    params = params or EvaluateConfig()
    table = _preference(pred, names, num_seen, params.protocol)
    results = evaluate_scores(pred.scores, pred.labels, num_seen, params.top_k, params.protocol)
    report = {"units": "fraction", "protocol": params.protocol} | _head_report(config, results)
    preference = (table, pred.query_counts.shape[1])
    shown = {"qks": results}
    outputs = Outputs(out, per_label, query_table)
    return _write(report, shown, names, num_seen, outputs, params, preference, echo)
