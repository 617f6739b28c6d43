"""Data-parallel training on the CPU (gloo, 2 processes through the elastic launcher): the same
steps as one process, exact resumption after a kill, and a dying rank ends the run with one line."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY_MODEL, _write_params

from qks_pipeline.config import EvaluateConfig, Params, TrainConfig
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.loader import open_loader
from qks_pipeline.stage_two.train import train
from qks_pipeline.store.features import open_cache
from qks_pipeline.store.synthetic import make_synthetic
from tests.tiny import train_args

MODEL = dataclasses.replace(TINY_MODEL, dropout=0.0)


def params(nproc: int, **train: object) -> Params:
    cfg = {
        "epochs": 1,
        "batch_size": 16,
        "lr": 1e-3,
        "val_fraction": 0.2,
        "scheduler": "none",
        "nproc": nproc,
    }
    return Params(
        model=MODEL, train=TrainConfig(**cfg | train), evaluate=EvaluateConfig(batch_size=64)
    )


def run(data, out: Path, p: Params, **kw: object):
    return train(
        data.train, data.labels, out, params=p, device="cpu", progress_bar=False, echo=print, **kw
    )


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    """Every tensor within `atol`, but the attention key biases: their gradient is 0 in exact
    arithmetic (a softmax ignores a shift shared by all keys), so Adam moves them by lr x the sign
    of rounding noise, which differs."""
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if not k.endswith("key.bias"):
            assert (wa[k] - wb[k]).abs().max().item() <= atol, k


def test_ranks_read_disjoint_shares_of_the_same_batches(tmp_path):
    """3 ranks each read their share of every global batch: together the one-process batch."""
    cache = open_cache(
        make_synthetic(tmp_path, num_train=70, num_test=16, invalid_train=(3, 40)).train
    )
    whole = list(open_loader(cache, batch_size=9, seed=5).epoch(2))
    shares = [
        list(dataclasses.replace(open_loader(cache, batch_size=9, seed=5), part=(r, 3)).epoch(2))
        for r in range(3)
    ]
    # 68 valid rows: 7 batches of 9 and one of 5
    assert all(len(s) == len(whole) == 8 for s in shares)
    for i, batch in enumerate(whole):
        parts = [s[i] for s in shares]
        assert [len(p.rows) for p in parts] == ([3, 3, 3] if i < 7 else [1, 2, 2])
        assert sorted(sum((p.rows.tolist() for p in parts), [])) == sorted(batch.rows.tolist())
        for p in parts:  # each share's tokens and labels are those of its rows in the whole batch
            at = [batch.rows.tolist().index(r) for r in p.rows.tolist()]
            assert torch.equal(p.tokens, batch.tokens[at]) and torch.equal(
                p.labels, batch.labels[at]
            )


@pytest.mark.parametrize(
    ("num_train", "batch", "epochs"),
    # 16 rows: one step, 8 per rank; 17 rows: batches 8, 8, 1 (rank 0's last share empty)
    [(20, 16, 1), (21, 8, 2)],
)
def test_two_ranks_take_the_steps_of_one_process(tmp_path, num_train, batch, epochs):
    data = make_synthetic(tmp_path / "data", num_train=num_train, num_test=16)
    one = run(data, tmp_path / "one", params(1, batch_size=batch, epochs=epochs))
    two = run(data, tmp_path / "two", params(2, batch_size=batch, epochs=epochs))
    for name in ("last.safetensors", "best.safetensors"):
        assert_close_weights(tmp_path / "one" / name, tmp_path / "two" / name, atol=1e-6)
    assert [r["loss"] for r in two.log] == pytest.approx([r["loss"] for r in one.log], rel=1e-6)
    assert [r["val_mAP"] for r in two.log] == pytest.approx(
        [r["val_mAP"] for r in one.log], abs=1e-6
    )


def test_batch_not_divisible_by_the_ranks_is_refused(tmp_path):
    data = make_synthetic(tmp_path / "data", num_train=20, num_test=16)
    with pytest.raises(QKSError, match="train.batch_size 15 is not divisible by the 2 processes"):
        run(data, tmp_path / "run", params(2, batch_size=15))


def _die_on_rank1(epoch: int) -> None:
    if os.environ.get("RANK") == "1" and epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_dying_rank_ends_the_run_in_one_line_and_the_checkpoint_resumes(tmp_path):
    data = make_synthetic(tmp_path / "data", num_train=40, num_test=16)
    p = params(2, batch_size=8, epochs=3)
    with pytest.raises(QKSError) as failure:
        run(data, tmp_path / "run", p, on_epoch_end=_die_on_rank1)
    assert str(failure.value).startswith("training rank 1 of 2 failed: Signal 9 (SIGKILL)")
    assert "\n" not in str(failure.value)
    resumed = run(
        data, tmp_path / "run", dataclasses.replace(p, train=dataclasses.replace(p.train, nproc=1))
    )
    # one process resumes what two left, from the last complete checkpoint
    assert resumed.epoch == 3


@pytest.mark.slow
def test_two_ranks_killed_mid_epoch_then_resumed_equal_an_uninterrupted_run(tmp_path, monkeypatch):
    # every rank of both runs: another thread count sums in another order
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = make_synthetic(tmp_path / "data", num_train=400, num_test=16)
    # dropout 0.1
    p = dataclasses.replace(params(2, batch_size=8, epochs=6, scheduler="cosine"), model=TINY_MODEL)
    run(data, tmp_path / "straight", p)
    cfg = _write_params(tmp_path / "params.yaml", p)
    qks = str(Path(sys.executable).parent / "qks")
    command = [qks, *train_args(data.train, data.labels, tmp_path / "killed", cfg, "--nproc", 2)]
    env = dict(os.environ)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    log = tmp_path / "killed" / "train_log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    time.sleep(0.2)  # into epoch 3
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert len(log.read_text().splitlines()) < 7, (
        "the run finished before the kill: nothing was tested"
    )
    subprocess.run(command, check=True, capture_output=True, env=env)
    for name in ("last.safetensors", "best.safetensors"):
        wa, wb = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
