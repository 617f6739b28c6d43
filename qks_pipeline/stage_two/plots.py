"""Plots as PNG files beside their CSVs: they open anywhere, and `dvc plots show` embeds them
without loading a charting library from the network (its vega pages need a CDN)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from qks_pipeline.atomic import atomic_write


def _rows(path: Path) -> list[dict[str, float | str]]:
    def value(text: str) -> float | str:
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _defined(value: float | str) -> bool:
    """A number, not NaN (an undefined metric) nor text."""
    return isinstance(value, float) and not math.isnan(value)


def _save(fig, out: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write(out, buf.getvalue())


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure  # not pyplot: no backend, no display, nothing global

    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, cols, squeeze=False)[0]


def plot_training(log_csv: str | Path, out: str | Path) -> None:
    """Training curves from `train_log.csv`: loss, validation score(s), learning rate per epoch."""
    rows = _rows(Path(log_csv))
    epochs = [r["epoch"] for r in rows]
    fig, (loss, score, lr) = _figure(1, 3, (13, 3.6))
    loss.plot(epochs, [r["loss"] for r in rows], marker="o")
    loss.set(title="training loss", xlabel="epoch")
    scores = [k for k in rows[0] if k.endswith("mAP") or k == "score"] if rows else []
    for key in scores:
        points = [(r["epoch"], r[key]) for r in rows if _defined(r[key])]
        if points:
            score.plot([e for e, _ in points], [v for _, v in points], marker="o", label=key)
    score.set(title="validation", xlabel="epoch")
    if score.lines:
        score.legend()
    lr.plot(epochs, [r["lr"] for r in rows], marker="o")
    lr.set(title="learning rate", xlabel="epoch", yscale="log")
    _save(fig, Path(out))


def plot_per_label_ap(per_label_csv: str | Path, out: str | Path, most: int = 40) -> None:
    """AP of each unseen label (the zero-shot result), best on top; beside it, every label's AP.

    At most `most` bars: the best and the worst halves when there are more. The second panel
    plots the seen and the unseen labels' AP, sorted.
    """
    rows = [r for r in _rows(Path(per_label_csv)) if _defined(r["ap"])]
    unseen = sorted((r for r in rows if r["split"] == "unseen"), key=lambda r: r["ap"])
    title = f"AP per unseen label ({len(unseen)})"
    if len(unseen) > most:
        unseen = unseen[: most // 2] + unseen[-most // 2 :]
        title = f"{title}: the {most // 2} worst and best"
    height = max(3.6, 0.22 * len(unseen))  # room for a bar per label
    fig, (bars, curve) = _figure(1, 2, (13, height))
    bars.barh([str(r["label"]) for r in unseen], [r["ap"] for r in unseen])
    bars.set(title=title, xlabel="AP", xlim=(0, 1))
    for split in ("seen", "unseen"):
        aps = sorted((r["ap"] for r in rows if r["split"] == split), reverse=True)
        share = [i / max(1, len(aps) - 1) for i in range(len(aps))]  # of the split's labels
        curve.plot(share, aps, label=f"{split} ({len(aps)})")
    curve.set(title="AP of every label, sorted", xlabel="share of labels", ylabel="AP", ylim=(0, 1))
    curve.legend()
    _save(fig, Path(out))
