"""What the training fault cases share: a synthetic cache with a tiny Q-Former's params, the
`qks train` command line, and the checks of a training output directory."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from qks_pipeline.store.synthetic import make_synthetic
from tests.tiny import train_args

TRAIN_PARAMS = {
    "model": {"num_queries": 4, "num_layers": 2, "num_heads": 4, "ff_dim": 64},
    "train": dict(
        epochs=6,
        batch_size=16,
        lr=1e-3,
        val_fraction=0.25,
        scheduler="plateau",
        early_stop=0,
        seed=0,
    ),
    "evaluate": {"batch_size": 64},
}
# train_log.csv columns that measure time: legitimately differ
TIMING_COLUMNS = ("time_s", "samples_per_s")


@dataclass(frozen=True)
class TrainSetup:
    train: Path  # training store
    labels: Path  # label-embedding store
    params: Path  # params.yaml


def make_train_setup(work: Path, num_train: int = 384, epochs: int = 6) -> TrainSetup:
    """Synthetic caches (qks_pipeline/store/synthetic.py) and a params file for a tiny Q-Former."""
    import yaml

    data = make_synthetic(work / "caches", num_train=num_train, num_test=32, invalid_train=(3, 77))
    params = json.loads(json.dumps(TRAIN_PARAMS))
    params["train"]["epochs"] = epochs
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return TrainSetup(data.train, data.labels, work / "params.yaml")


def train_argv(setup: TrainSetup, out: Path) -> list[str]:
    return train_args(setup.train, setup.labels, out, setup.params)


def log_rows(out: Path) -> list[dict[str, str]]:
    path = out / "train_log.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def compare_runs(out: Path, reference: Path) -> list[str]:
    """How a training output directory differs from a clean run's: weights and config byte for
    byte, the log without its timing columns. Empty when equal."""
    names = ("best.safetensors", "last.safetensors", "config.json")
    problems = [
        n
        for n in names
        if not (out / n).exists() or (out / n).read_bytes() != (reference / n).read_bytes()
    ]
    untimed = [
        [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in log_rows(d)]
        for d in (out, reference)
    ]
    if untimed[0] != untimed[1]:
        problems.append("train_log.csv")
    return problems


def checkpoint_problems(out: Path, epochs: int) -> list[str]:
    """Files of a training directory that do not load, or a resume point past the run's epochs."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for name in ("best.safetensors", "last.safetensors"):
        if (out / name).exists():
            try:
                load_file(out / name)
            except Exception as e:
                problems.append(f"{name}: {type(e).__name__}")
    if (out / "last_state.pt").exists():
        try:
            epoch = torch.load(out / "last_state.pt", weights_only=True)["progress"]["epoch"]
            problems += [f"last_state.pt at epoch {epoch} > {epochs}"] if epoch > epochs else []
        except Exception as e:
            problems.append(f"last_state.pt: {type(e).__name__}")
    return problems
