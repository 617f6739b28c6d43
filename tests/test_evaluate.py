"""Evaluation from the test cache: metrics, per-label and query-preference tables, the CLIP baseline, stale inputs,
and imported reference checkpoints."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from qks_reference_impl import random_reference_state
from synthetic import make_synthetic

from qks_pipeline.backbone import backbone_fingerprint, load_backbone
from qks_pipeline.cache import open_cache, read_label_embeddings
from qks_pipeline.cli import main
from qks_pipeline.config import EvaluateConfig, ModelConfig, Params, TrainConfig
from qks_pipeline.errors import QKSError
from qks_pipeline.evaluate import SELECTED_ON_TEST, evaluate, load_checkpoint, predict
from qks_pipeline.loader import open_loader
from qks_pipeline.metrics import evaluate_scores
from qks_pipeline.train import train

EVAL = EvaluateConfig(top_k=[2, 3], batch_size=32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic caches and a checkpoint trained on them for two epochs."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_synthetic(root, num_train=96, num_test=48)
    p = Params(model=ModelConfig(num_queries=4, num_layers=1, num_heads=4, ff_dim=32),
               train=TrainConfig(epochs=2, batch_size=16, lr=1e-3, val_fraction=0.25))  # fmt: skip
    torch.set_num_threads(1)
    train(data.train, data.labels, root / "ckpt", params=p, progress_bar=False, echo=lambda _: None)
    return data, root / "ckpt"


def _in_unit_interval(metrics: dict) -> bool:
    keys = [k for k in metrics if k == "mAP" or "@" in k]
    return len(keys) == 7 and all(0.0 <= metrics[k] <= 1.0 for k in keys)


def test_evaluate_writes_metrics_and_tables(run, tmp_path):
    data, ckpt = run
    out, per_label, queries = tmp_path / "metrics.json", tmp_path / "ap.csv", tmp_path / "q.csv"
    lines: list[str] = []
    report = evaluate(data.test, data.labels, out, checkpoint=ckpt, params=EVAL, per_label=per_label,
                      query_table=queries, device="cpu", echo=lines.append)  # fmt: skip
    written = json.loads(out.read_text())
    assert written == report and written["units"] == "fraction" and written["selection"] == "val"
    for setting in ("zsl", "gzsl", "seen"):
        assert _in_unit_interval(written[setting]), written[setting]
    assert written["zsl"]["num_labels"] == 4 and written["seen"]["num_labels"] == 8
    rows = list(csv.DictReader(open(per_label)))
    assert [r["label"] for r in rows] == data.label_names
    assert [r["split"] for r in rows] == ["seen"] * 8 + ["unseen"] * 4
    labels = open_cache(data.test).group["labels"][:]
    assert [int(r["positives"]) for r in rows] == list((labels == 1).sum(0))
    unseen_ap = [float(r["ap"]) for r in rows[8:]]
    assert np.isclose(np.mean(unseen_ap), written["zsl"]["mAP"])
    table = list(csv.DictReader(open(queries)))
    for r in table:  # every positive image is won by exactly one query
        assert sum(int(r[f"q{q}"]) for q in range(4)) == int(r["positives"])
    text = "\n".join(lines)
    assert "\nZSL     qks" in text and "query preference (4 queries)" in text


def test_query_index_matches_the_model(run):
    data, ckpt = run
    model, _ = load_checkpoint(ckpt, torch.device("cpu"))
    cache = open_cache(data.test)
    batch = next(iter(open_loader(cache, batch_size=8, shuffle=False).epoch(0)))
    emb = torch.randn(5, 16)
    with torch.no_grad():
        feats = model.query_features(batch.tokens) @ model.proj  # (B, N, E)
        per_query = feats @ emb.T  # (B, N, C)
        logits, index = model(batch.tokens, emb, return_query_index=True)
    torch.testing.assert_close(per_query.gather(1, index.unsqueeze(1)).squeeze(1), logits)


def test_clip_baseline_alone_and_beside_the_model(run, tmp_path):
    data, ckpt = run
    report = evaluate(data.test, data.labels, tmp_path / "clip.json", baseline="clip", params=EVAL, device="cpu",
                      echo=lambda _: None)  # fmt: skip
    assert report["model"] == "clip_zero_shot" and report["selection"] == "none"
    cache = open_cache(data.test)  # brute force: CLS @ proj, cosine with the label embeddings
    cls = cache.tokens[:, 0, 0].astype(np.float64) @ cache.group["visual_proj"][:]
    emb = read_label_embeddings(data.labels)[1]
    cos = (cls / np.linalg.norm(cls, axis=1, keepdims=True)) @ (emb / np.linalg.norm(emb, axis=1, keepdims=True)).T
    expected = evaluate_scores(cos, cache.group["labels"][:], data.label_names, data.num_seen, EVAL.top_k)
    for setting in ("zsl", "gzsl", "seen"):
        assert report[setting]["mAP"] == pytest.approx(expected[setting]["mAP"], abs=1e-6)
    both = evaluate(data.test, data.labels, tmp_path / "both.json", checkpoint=ckpt, baseline="clip", params=EVAL,
                    device="cpu", echo=lambda _: None)  # fmt: skip
    assert both["model"] == "qks" and both["clip_zero_shot"]["zsl"]["mAP"] == report["zsl"]["mAP"]
    with pytest.raises(QKSError, match="nothing to evaluate"):
        evaluate(data.test, data.labels, tmp_path / "x.json", params=EVAL)


def test_predict_scores_valid_rows_only(tmp_path):
    data = make_synthetic(tmp_path, num_train=40, num_test=8, invalid_train=(1, 39))
    loader = open_loader(open_cache(data.train), batch_size=16, shuffle=False)
    pred = predict(lambda t: t[:, 0, :3].float(), loader, torch.device("cpu"))
    assert pred.scores.shape == (38, 3) and 1 not in pred.rows and 39 not in pred.rows


def test_stale_checkpoint_or_labels_refused(run, tmp_path):
    data, ckpt = run
    other = make_synthetic(tmp_path, num_train=16, num_test=16, backbone={"model": "ViT-L-14"})
    with pytest.raises(QKSError, match=r"test cache vs the checkpoint.*model is 'ViT-L-14'"):
        evaluate(other.test, other.labels, tmp_path / "m.json", checkpoint=ckpt, params=EVAL)
    with pytest.raises(QKSError, match="label embeddings"):
        evaluate(data.test, other.labels, tmp_path / "m.json", checkpoint=ckpt, params=EVAL)


def test_selection_on_test_reaches_the_metrics(run, tmp_path):
    data, ckpt = run
    config = json.loads((ckpt / "config.json").read_text())
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "best.safetensors").write_bytes((ckpt / "best.safetensors").read_bytes())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config | {"selection": "test"}))
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--test-cache",
                                       str(data.test), "--labels", str(data.labels), "--out",
                                       str(tmp_path / "m.json"), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert SELECTED_ON_TEST in result.output
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["selection"] == "test" and written["warning"] == SELECTED_ON_TEST


def test_import_reference_checkpoint(tiny_clip, tmp_path):
    config_json, _ = tiny_clip
    d, e = 64, 32  # the tiny CLIP's width and embedding size
    clip_state = load_backbone(str(config_json), "none")[0].state_dict()
    raw = random_reference_state(2, 3, d, e, 16, seed=1)
    raw |= {f"clip_model.{k}": v for k, v in clip_state.items() if k != "visual.proj"}
    torch.save(raw, tmp_path / "ref.pth")
    result = CliRunner().invoke(main, ["import-checkpoint", str(tmp_path / "ref.pth"), "--out", str(tmp_path / "ck"),
                                       "--model", str(config_json), "--num-heads", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    clip = load_backbone(str(config_json), str(tmp_path / "ck" / "clip_weights.pt"))[0]
    expected = backbone_fingerprint(clip, str(config_json), str(tmp_path / "ck" / "clip_weights.pt"))
    assert config["fingerprint"] == json.loads(json.dumps(expected)) and config["selection"] == "test"
    model, _ = load_checkpoint(tmp_path / "ck", torch.device("cpu"))
    assert model.cfg.num_queries == 3 and len(model.layers) == 2
    torch.testing.assert_close(model.proj.detach(), raw["proj"])
    # a cache extracted with that backbone is accepted by evaluate
    data = make_synthetic(tmp_path / "data", num_train=8, num_test=24, dim=d, embed_dim=e, backbone=expected)
    report = evaluate(data.test, data.labels, tmp_path / "m.json", checkpoint=tmp_path / "ck", params=EVAL,
                      device="cpu", echo=lambda _: None)  # fmt: skip
    assert report["selection"] == "test" and _in_unit_interval(report["zsl"])
