"""SIGKILL `qks train` mid-epoch; each rerun resumes from the last checkpoint and, on the CPU with
the same seed, ends with the same weights (safetensors bytes), config.json and log (timing columns
aside) as an uninterrupted run."""

from __future__ import annotations

import pytest

import qks_pipeline.stage_two.train as training
from qks_pipeline.config import EvaluateConfig, ModelConfig, Params, TrainConfig
from qks_pipeline.store.synthetic import make_synthetic
from tests.reliability.faults.kills import training_kills
from tests.reliability.faults.training import compare_runs, make_train_setup


def test_sigkill_training_twice_resumes_to_the_same_weights(runner, tmp_path):
    setup = make_train_setup(tmp_path / "setup", num_train=256, epochs=4)
    outcome = training_kills(runner, tmp_path, setup, kills=2, epochs=4, seed=2)
    assert outcome.trials == 2
    assert outcome.clean, outcome.notes


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


# every file `train` writes
WRITERS = ("save_weights", "save_state", "write_csv", "atomic_write", "write_config")


def _kill_after_writes(monkeypatch: pytest.MonkeyPatch, die_after: int | None) -> list[str]:
    """Count a `train` call's checkpoint writes; raise Killed right after write `die_after`."""
    calls: list[str] = []

    def counted(name: str, real):
        def wrapped(*args, **kwargs):
            real(*args, **kwargs)
            calls.append(name)
            if len(calls) == die_after:
                raise Killed

        return wrapped

    for name in WRITERS:
        monkeypatch.setattr(training, name, counted(name, getattr(training, name)))
    return calls


def test_a_kill_between_any_two_checkpoint_writes_of_the_final_epoch(tmp_path, monkeypatch):
    """Die right after each of the last writes of a run (best, config, last weights, log, resume
    point, in whatever order `_save_epoch` writes them): the same command again must end with the
    files of an uninterrupted run, never with a run that looks complete but holds an older epoch's
    weights or log."""
    data = make_synthetic(tmp_path / "data", num_train=64, num_test=32)
    params = Params(
        model=ModelConfig(num_queries=4, num_layers=1, num_heads=4, ff_dim=32),
        train=TrainConfig(epochs=2, batch_size=16, lr=1e-3, val_fraction=0.25, scheduler="none"),
        evaluate=EvaluateConfig(batch_size=64),
    )
    quiet = {"params": params, "device": "cpu", "progress_bar": False, "echo": lambda _: None}
    with monkeypatch.context() as m:
        calls = _kill_after_writes(m, None)
        training.train(data.train, data.labels, tmp_path / "clean", **quiet)
    assert len(calls) >= 6, calls
    for k in range(len(calls) - 6, len(calls)):
        out = tmp_path / f"killed_after_{k}"
        with monkeypatch.context() as m:
            _kill_after_writes(m, k)
            with pytest.raises(Killed):
                training.train(data.train, data.labels, out, **quiet)
        training.train(data.train, data.labels, out, **quiet)  # the same command again
        assert compare_runs(out, tmp_path / "clean") == [], (
            f"killed after write {k} ({calls[k - 1]})"
        )


@pytest.mark.slow
@pytest.mark.soak
def test_soak_ten_kills(runner, tmp_path):
    setup = make_train_setup(tmp_path / "setup", num_train=384, epochs=8)
    outcome = training_kills(runner, tmp_path, setup, kills=10, epochs=8, seed=5)
    assert outcome.trials == 10
    assert outcome.clean, outcome.notes
