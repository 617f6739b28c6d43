"""Training from the cache: learns, resumes exactly, refuses mismatched inputs, test selection."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from qks_pipeline.cli import main
from qks_pipeline.config import EvaluateConfig, ModelConfig, Params, TrainConfig
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.evaluate import SELECTED_ON_TEST
from qks_pipeline.stage_two.loader import open_loader
from qks_pipeline.stage_two.train import (
    make_session,
    open_inputs,
    score_epoch,
    train,
    train_epoch,
    train_step,
)
from qks_pipeline.store.features import create_cache
from qks_pipeline.store.fingerprint import make_fingerprint
from qks_pipeline.store.location import Location
from qks_pipeline.store.synthetic import make_synthetic
from tests.qks_reference_impl import reference_step
from tests.tiny import train_args

TINY_MODEL = ModelConfig(num_queries=4, num_layers=2, num_heads=4, ff_dim=64)


def params(**train: object) -> Params:
    cfg = {"epochs": 3, "batch_size": 16, "lr": 1e-3, "val_fraction": 0.25} | train
    return Params(
        model=TINY_MODEL, train=TrainConfig(**cfg), evaluate=EvaluateConfig(batch_size=64)
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp("train"), num_train=128, num_test=64, invalid_train=(5, 70)
    )


def quiet(**kw):
    return {"progress_bar": False, "echo": lambda _: None} | kw


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_training_improves_validation_map(data, tmp_path):
    p = params(epochs=4, scheduler="none")
    inputs = open_inputs(data.train, data.labels, None)
    before = score_epoch(make_session(p, inputs, torch.device("cpu")))["val_mAP"]
    progress = train(data.train, data.labels, tmp_path / "run", params=p, **quiet())
    assert progress.epoch == 4 and progress.best_epoch >= 1
    assert progress.best_score > before + 0.05, (before, progress.best_score)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["best"]["score"] == progress.best_score and config["selection"] == "val"
    assert config["fingerprint"] == open_inputs(data.train, data.labels, None).backbone
    with open(tmp_path / "run" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and 0 <= float(r["val_mAP"]) <= 1 for r in rows)


class Killed(Exception):
    pass


def _kill_after(epoch: int):
    def hook(done: int) -> None:
        if done == epoch:
            raise Killed

    return hook


@pytest.mark.parametrize("scheduler", ["plateau", "cosine"])
def test_resume_equals_uninterrupted(data, tmp_path, scheduler):
    p = params(epochs=3, scheduler=scheduler)
    train(data.train, data.labels, tmp_path / "straight", params=p, **quiet())
    with pytest.raises(Killed):  # dies right after epoch 1's checkpoint
        train(
            data.train,
            data.labels,
            tmp_path / "resumed",
            params=p,
            **quiet(on_epoch_end=_kill_after(1)),
        )
    lines: list[str] = []
    progress = train(
        data.train, data.labels, tmp_path / "resumed", params=p, **quiet(echo=lines.append)
    )
    assert any(line.startswith("resuming") for line in lines) and progress.epoch == 3
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    logs = [
        list(csv.DictReader(open(tmp_path / d / "train_log.csv"))) for d in ("straight", "resumed")
    ]
    assert [(r["loss"], r["lr"], r["val_mAP"]) for r in logs[0]] == [
        (r["loss"], r["lr"], r["val_mAP"]) for r in logs[1]
    ]


def test_more_epochs_continue_and_no_resume_restarts(data, tmp_path):
    out = tmp_path / "run"
    train(data.train, data.labels, out, params=params(epochs=1, scheduler="none"), **quiet())
    progress = train(
        data.train, data.labels, out, params=params(epochs=2, scheduler="none"), **quiet()
    )
    assert progress.epoch == 2 and len(progress.log) == 2
    with pytest.raises(QKSError, match="train.lr"):
        train(
            data.train,
            data.labels,
            out,
            params=params(epochs=2, lr=1e-4, scheduler="none"),
            **quiet(),
        )
    progress = train(
        data.train, data.labels, out, params=params(epochs=1, lr=1e-4), resume=False, **quiet()
    )
    assert progress.epoch == 1


def test_one_run_at_a_time_writes_a_training_directory(data, tmp_path):
    out = tmp_path / "run"
    # as another `qks train --out run` holds it
    with Location.of(out).writer_lock("training run", "directory"):
        with pytest.raises(QKSError) as e:
            train(data.train, data.labels, out, params=params(epochs=1), **quiet())
        cfg = _write_params(tmp_path / "params.yaml", params(epochs=1))
        result = CliRunner().invoke(main, train_args(data.train, data.labels, out, cfg))
    message = f"{out}: another training run is writing this directory (pid {os.getpid()}"
    assert str(e.value).startswith(message) and "lock run.lock" in str(e.value)
    assert result.exit_code == 1 and f"Error: {message}" in result.output
    assert not (out / "config.json").exists()
    assert train(data.train, data.labels, out, params=params(epochs=1), **quiet()).epoch == 1


def test_resuming_on_other_inputs_is_refused_in_one_line(data, tmp_path):
    """Another training store (other data), another label store (other embeddings) or another
    test store under selection 'test': the run in `out` is not continued on them."""
    out = tmp_path / "run"
    p = params(epochs=1, selection="test")
    train(data.train, data.labels, out, params=p, test_path=data.test, **quiet())
    other = make_synthetic(tmp_path / "other", num_train=128, num_test=64, seed=1)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    p2 = params(epochs=2, selection="test")
    cases = [
        ((other.train, data.labels, data.test), "training store synthetic_seed"),
        ((data.train, other.labels, data.test), "label store"),
        ((data.train, data.labels, other.test), "test store synthetic_seed"),
    ]
    for (cache, labels, test), what in cases:
        with pytest.raises(QKSError) as e:
            train(cache, labels, out, params=p2, test_path=test, **quiet())
        message = str(e.value)
        assert message.startswith(f"{out}: holds a run with other settings ({what}")
        assert "--no-resume" in message and "\n" not in message
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    progress = train(data.train, data.labels, out, params=p2, test_path=data.test, **quiet())
    assert progress.epoch == 2


def test_temporary_files_of_a_killed_save_are_removed_on_the_next_start(data, tmp_path):
    out = tmp_path / "run"
    train(data.train, data.labels, out, params=params(epochs=1), **quiet())
    left = [out / ".last_state.pt.tmp4242", out / ".best.safetensors.tmp17"]
    for path in left:
        path.write_bytes(b"half a file")
    lines: list[str] = []
    train(data.train, data.labels, out, params=params(epochs=2), **quiet(echo=lines.append))
    assert not any(path.exists() for path in left)
    assert any(
        line.startswith("removed 2 temporary file(s) of an interrupted save") for line in lines
    )


def test_early_stopping(data, tmp_path):
    progress = train(
        data.train, data.labels, tmp_path, params=params(epochs=6, lr=0.0, early_stop=2), **quiet()
    )
    # lr 0: nothing improves
    assert progress.stopped_early and progress.epoch == 3 and progress.best_epoch == 1


def test_selection_on_test_is_reported(data, tmp_path):
    with pytest.raises(QKSError, match="--test-cache"):
        train(data.train, data.labels, tmp_path, params=params(selection="test"), **quiet())
    lines: list[str] = []
    p = params(epochs=1, selection="test")
    progress = train(
        data.train, data.labels, tmp_path, params=p, test_path=data.test, **quiet(echo=lines.append)
    )
    assert (
        progress.log[0]["metric"] == "test_zsl_mAP+f1@3+f1@5"
        and 0 <= progress.log[0]["test_zsl_mAP"] <= 1
    )
    assert sum(SELECTED_ON_TEST in line for line in lines) >= 2  # at the start and at the end
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["selection"] == "test" and "TEST set" in config["selection_note"]


def test_stale_or_incomplete_inputs_are_refused(data, tmp_path):
    other = make_synthetic(
        tmp_path / "other", num_train=16, num_test=16, backbone={"model": "ViT-L-14"}
    )
    with pytest.raises(QKSError, match=r"label store vs .*backbone.model is 'ViT-L-14'"):
        train(data.train, other.labels, tmp_path / "a", params=params(), **quiet())
    with pytest.raises(QKSError, match=r"test vs training store.*backbone.model is 'ViT-L-14'"):
        train(
            data.train,
            data.labels,
            tmp_path / "a",
            params=params(),
            test_path=other.test,
            **quiet(),
        )
    shape = {
        "token_shape": (10, 32),
        "num_views": 1,
        "shard_size": 8,
        "visual_proj": torch.zeros(32, 16).numpy(),
    }
    rows = {"paths": [str(i) for i in range(16)], "manifest_index": torch.arange(16).numpy()}
    labels = {
        "label_names": data.label_names,
        "num_seen": data.num_seen,
        "labels": torch.zeros(16, 12).char().numpy(),
    }
    fingerprint = make_fingerprint({"model": "synthetic"})
    empty = create_cache(
        tmp_path / "empty.zarr", fingerprint=fingerprint, **shape, **rows, **labels
    )
    with pytest.raises(QKSError, match="incomplete: 2 of 2 shards"):
        train(empty.path, data.labels, tmp_path / "b", params=params(), **quiet())


def _write_params(path: Path, p: Params) -> Path:
    path.write_text(
        yaml.safe_dump(
            {k: dataclasses.asdict(getattr(p, k)) for k in ("model", "train", "evaluate")}
        )
    )
    return path


def test_cli_train(data, tmp_path):
    cfg = _write_params(tmp_path / "params.yaml", params(epochs=1))
    args = train_args(data.train, data.labels, tmp_path / "run", cfg)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "best checkpoint:" in result.output and (tmp_path / "run" / "best.safetensors").exists()
    if not torch.cuda.is_available():
        result = CliRunner().invoke(main, [*args[:-3], "--device", "cuda"])
        assert result.exit_code == 1 and "no CUDA device" in result.output


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(data, tmp_path):
    """A real kill at an arbitrary moment (mid-epoch or mid-write), then the same command again."""
    cfg = _write_params(tmp_path / "params.yaml", params(epochs=12, scheduler="cosine"))

    def command(out: Path) -> list[str]:
        return [
            str(Path(sys.executable).parent / "qks"),
            *train_args(data.train, data.labels, out, cfg),
        ]

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "straight"), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(
        command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    log = tmp_path / "killed" / "train_log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(log.read_text().splitlines()) < 13, (
        "the run finished before the kill: nothing was tested"
    )
    subprocess.run(command(tmp_path / "killed"), check=True, capture_output=True, env=env)
    assert_same_weights(
        tmp_path / "straight" / "last.safetensors", tmp_path / "killed" / "last.safetensors"
    )
    assert_same_weights(
        tmp_path / "straight" / "best.safetensors", tmp_path / "killed" / "best.safetensors"
    )


def test_one_and_three_steps_equal_the_reference_step(data):
    """Our step (session, loss, AdamW) vs the reference's, written apart; float64, no dropout."""
    p = dataclasses.replace(
        params(lr=1e-3, weight_decay=0.05), model=dataclasses.replace(TINY_MODEL, dropout=0.0)
    )
    s = make_session(p, open_inputs(data.train, data.labels, None), torch.device("cpu"))
    s.model.double()
    emb_seen = s.emb[: s.num_seen].double()
    ref = {k: v.detach().clone() for k, v in s.model.named_parameters()}
    assert ref.keys() == s.model.state_dict().keys()  # every tensor is trained
    state: dict = {}
    for step, batch in zip(range(3), s.train_loader.epoch(0), strict=False):
        ours = train_step(s, batch.tokens, batch.labels, emb_seen).item() / len(batch.labels)
        theirs = reference_step(
            ref, (batch.tokens, emb_seen, batch.labels), TINY_MODEL.num_heads, state, 1e-3, 0.05
        )
        assert ours == pytest.approx(theirs, rel=1e-12)
        if step in (0, 2):
            worst = max((v - ref[k]).abs().max().item() for k, v in s.model.named_parameters())
            assert worst <= 1e-10, (step + 1, worst)
    assert state["t"] == 3


def _zsl_map(scores: torch.Tensor, labels: torch.Tensor, unseen: slice) -> float:
    """Mean over unseen labels of AP on the annotated entries of images with an unseen positive."""
    scores, labels = scores[:, unseen], labels[:, unseen]
    keep = (labels == 1).any(dim=1)
    aps = []
    for s, y in zip(scores[keep].T, labels[keep].T, strict=True):
        # annotated entries, best score first
        y = y[y != 0][s[y != 0].argsort(descending=True)] == 1
        if y.any():
            aps.append((y.cumsum(0)[y] / (torch.nonzero(y)[:, 0] + 1)).mean().item())
    return sum(aps) / len(aps)


def test_qks_trained_on_seen_labels_beats_clip_on_unseen_labels(tmp_path):
    """The method's claim on synthetic data whose label evidence lives in the patch tokens (CLS
    weight 0.05): queries trained on 16 seen labels transfer to 8 unseen ones better than CLIP's
    zero-shot CLS score."""
    d = make_synthetic(
        tmp_path, num_train=192, num_test=128, num_seen=16, num_unseen=8, cls_weight=0.05
    )
    model = ModelConfig(num_queries=4, num_layers=2, num_heads=4, ff_dim=64, dropout=0.0)
    p = Params(model=model, train=TrainConfig(epochs=20, batch_size=16, lr=3e-4, val_fraction=0.0))
    inputs = open_inputs(d.train, d.labels, d.test)
    s = make_session(p, inputs, torch.device("cpu"))
    for epoch in range(p.train.epochs):
        train_epoch(s, epoch, progress_bar=False)
    batch = next(open_loader(inputs.test, batch_size=1000, shuffle=False).epoch(0))
    proj = torch.from_numpy(inputs.test.visual_proj[:])
    emb = torch.as_tensor(inputs.embeddings)
    s.model.eval()
    with torch.no_grad():
        ours = s.model(batch.tokens, emb)  # (N, C)
    # (N, C)
    clip = F.normalize(batch.tokens[:, 0].float() @ proj, dim=1) @ F.normalize(emb, dim=1).T
    unseen = slice(d.num_seen, None)
    ours_map, clip_map = _zsl_map(ours, batch.labels, unseen), _zsl_map(clip, batch.labels, unseen)
    assert ours_map > clip_map + 0.1, (ours_map, clip_map)
