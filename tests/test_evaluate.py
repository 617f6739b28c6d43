"""Evaluation from the test store: metrics, per-label and query-preference tables, the CLIP baseline
(one template or the pool), the protocols, labels that cannot be scored, refused inputs (split,
backbone, template pool), and imported reference checkpoints."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qks_pipeline.cli import main
from qks_pipeline.config import (
    BackboneConfig,
    EvaluateConfig,
    LabelsConfig,
    ModelConfig,
    Params,
    TrainConfig,
)
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_one.backbone import load_backbone
from qks_pipeline.stage_two.checkpoint import load as load_checkpoint
from qks_pipeline.stage_two.evaluate import evaluate, read_report
from qks_pipeline.stage_two.loader import open_loader
from qks_pipeline.stage_two.metrics import (
    SELECTED_ON_TEST,
    SELECTION_SCORES,
    evaluate_scores,
    reference_scores,
)
from qks_pipeline.stage_two.scoring import model_scorer, score_rows
from qks_pipeline.stage_two.train import train
from qks_pipeline.store.features import open_cache
from qks_pipeline.store.label_store import CLIP_EMBEDDINGS, read_label_embeddings
from qks_pipeline.store.synthetic import make_synthetic
from tests.qks_reference_impl import random_reference_state

EVAL = EvaluateConfig(top_k=[2, 3], batch_size=32)
QUIET = {"device": "cpu", "echo": lambda _: None}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic stores and a checkpoint trained on them for two epochs."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_synthetic(root, num_train=96, num_test=48)
    model = ModelConfig(num_queries=4, num_layers=1, num_heads=4, ff_dim=32)
    p = Params(model=model, train=TrainConfig(epochs=2, batch_size=16, lr=1e-3, val_fraction=0.25))
    torch.set_num_threads(1)
    train(data.train, data.labels, root / "ckpt", params=p, progress_bar=False, echo=lambda _: None)
    return data, root / "ckpt"


def _evaluate_args(ckpt: Path, test: Path, labels: Path, out: Path) -> list[str]:
    args = [
        "evaluate",
        "--checkpoint",
        ckpt,
        "--test-cache",
        test,
        "--labels",
        labels,
        "--out",
        out,
        "--device",
        "cpu",
    ]
    return [str(a) for a in args]


def _in_unit_interval(metrics: dict) -> bool:
    keys = [k for k in metrics if k == "mAP" or "@" in k]
    return len(keys) == 7 and all(0.0 <= metrics[k] <= 1.0 for k in keys)


def _logits(data, ckpt) -> tuple[np.ndarray, np.ndarray]:
    """The head's float32 logits and labels over the test store, recomputed here."""
    model, _ = load_checkpoint(ckpt, torch.device("cpu"))
    emb = torch.from_numpy(read_label_embeddings(data.labels)[1])
    pred = score_rows(
        model_scorer(model, emb),
        open_loader(open_cache(data.test), batch_size=16, shuffle=False),
        "cpu",
    )
    return pred.scores, pred.labels


def test_evaluate_writes_metrics_and_tables(run, tmp_path):
    data, ckpt = run
    out, per_label, queries = tmp_path / "metrics.json", tmp_path / "ap.csv", tmp_path / "q.csv"
    lines: list[str] = []
    report = evaluate(
        data.test,
        data.labels,
        out,
        checkpoint=ckpt,
        params=EVAL,
        per_label=per_label,
        query_table=queries,
        device="cpu",
        echo=lines.append,
    )
    written = read_report(out)
    assert written == report and written["units"] == "fraction" and written["selection"] == "val"
    assert (
        written["protocol"] == "standard"
        and written["selection_note"] == f"selection score: {SELECTION_SCORES['val']}"
    )
    for setting in ("zsl", "gzsl", "seen"):
        assert _in_unit_interval(written[setting]), written[setting]
        assert (
            written[setting]["labels_without_positive"]
            == written[setting]["labels_without_negative"]
            == 0
        )
    assert written["zsl"]["num_labels_scored"] == 4 and written["seen"]["num_labels_scored"] == 8
    scores, labels = _logits(data, ckpt)
    expected = evaluate_scores(scores, labels, data.num_seen, EVAL.top_k)
    assert written["gzsl"]["mAP"] == pytest.approx(expected["gzsl"]["mAP"], rel=1e-12)
    rows = list(csv.DictReader(open(per_label)))
    assert [r["label"] for r in rows] == data.label_names
    assert [r["split"] for r in rows] == ["seen"] * 8 + ["unseen"] * 4
    assert [int(r["positives"]) for r in rows] == list((labels == 1).sum(0))
    assert np.isclose(np.mean([float(r["ap"]) for r in rows[8:]]), written["zsl"]["mAP"])
    table = list(csv.DictReader(open(queries)))  # each positive image is won by exactly one query
    assert [sum(int(r[f"q{q}"]) for q in range(4)) for r in table] == list((labels == 1).sum(0))
    model, _ = load_checkpoint(ckpt, torch.device("cpu"))
    tokens = torch.from_numpy(open_cache(data.test).tokens[:, 0]).float()
    with torch.no_grad():
        index = model(
            tokens, torch.from_numpy(read_label_embeddings(data.labels)[1]), return_query_index=True
        )[1]
    assert [int(r["q1"]) for r in table] == list(
        ((index == 1).numpy() & (open_cache(data.test).labels[:] == 1)).sum(0)
    )
    text = "\n".join(lines)
    assert (
        "\nZSL     qks" in text and "query preference (4 queries)" in text and "WARNING" not in text
    )


def test_query_index_matches_the_model(run):
    data, ckpt = run
    model, _ = load_checkpoint(ckpt, torch.device("cpu"))
    batch = next(iter(open_loader(open_cache(data.test), batch_size=8, shuffle=False).epoch(0)))
    emb = torch.randn(5, 16)
    with torch.no_grad():
        feats = model.query_features(batch.tokens) @ model.proj  # (B, N, E)
        per_query = feats @ emb.T  # (B, N, C)
        logits, index = model(batch.tokens, emb, return_query_index=True)
    torch.testing.assert_close(per_query.gather(1, index.unsqueeze(1)).squeeze(1), logits)


def _brute_clip(data, emb: np.ndarray) -> dict:
    cache = open_cache(data.test)  # CLS @ proj, cosine with the label embeddings, in float64
    cls = cache.tokens[:, 0, 0].astype(np.float64) @ cache.visual_proj[:]
    cos = (cls / np.linalg.norm(cls, axis=1, keepdims=True)) @ (
        emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ).T
    return evaluate_scores(cos, cache.labels[:], data.num_seen, EVAL.top_k)


def test_clip_baseline_one_template_or_pool(run, tmp_path):
    data, ckpt = run
    report = evaluate(
        data.test, data.labels, tmp_path / "clip.json", baseline="clip", params=EVAL, **QUIET
    )
    assert report["model"] == "clip_zero_shot" and report["selection"] == "none"
    assert (
        report["clip_labels"].startswith("one template") and "clip_eval.py" in report["clip_labels"]
    )
    expected = _brute_clip(data, read_label_embeddings(data.labels, CLIP_EMBEDDINGS)[1])
    for setting in ("zsl", "gzsl", "seen"):
        assert report[setting]["mAP"] == pytest.approx(expected[setting]["mAP"], abs=1e-6)
    pool = EvaluateConfig(top_k=EVAL.top_k, clip_labels="pool")
    both = evaluate(
        data.test,
        data.labels,
        tmp_path / "both.json",
        checkpoint=ckpt,
        baseline="clip",
        params=pool,
        **QUIET,
    )
    assert both["model"] == "qks" and "pool" in both["clip_zero_shot"]["clip_labels"]
    expected = _brute_clip(data, read_label_embeddings(data.labels)[1])
    assert both["clip_zero_shot"]["zsl"]["mAP"] == pytest.approx(expected["zsl"]["mAP"], abs=1e-6)
    with pytest.raises(QKSError, match="nothing to evaluate"):
        evaluate(data.test, data.labels, tmp_path / "x.json", params=EVAL)


TABLE = {"mAP", "p@2", "r@2", "f1@2", "p@3", "r@3", "f1@3"}


def test_the_metrics_file_holds_the_papers_numbers_and_the_details_the_rest(run, tmp_path):
    """`dvc metrics show` reads the metrics file: 7 numbers per setting and model, no counts."""
    data, ckpt = run
    out = tmp_path / "both.json"
    report = evaluate(
        data.test, data.labels, out, checkpoint=ckpt, baseline="clip", params=EVAL, **QUIET
    )
    numbers = json.loads(out.read_text())
    assert numbers.keys() == {"zsl", "gzsl", "clip_zero_shot"}
    assert numbers["clip_zero_shot"].keys() == {"zsl", "gzsl"}
    for m in (numbers["zsl"], numbers["gzsl"], *numbers["clip_zero_shot"].values()):
        assert m.keys() == TABLE and _in_unit_interval(m)
    assert numbers["gzsl"]["mAP"] == report["gzsl"]["mAP"]
    details = json.loads((tmp_path / "both_details.json").read_text())
    assert details["seen"] == report["seen"] and details["protocol"] == "standard"
    assert details["zsl"]["num_labels_scored"] == 4 and "mAP" not in details["zsl"]
    assert details["clip_zero_shot"]["clip_labels"].startswith("one template")
    assert read_report(out) == report


def test_evaluate_writes_all_of_its_outputs_or_none(run, tmp_path):
    """The metrics JSON cannot be written (its folder is a file): no table is left behind."""
    data, ckpt = run
    tables = tmp_path / "tables"
    tables.mkdir()
    (tmp_path / "blocked").write_text("a file, not a folder")
    args = _evaluate_args(ckpt, data.test, data.labels, tmp_path / "blocked" / "m.json")
    args += ["--per-label", str(tables / "ap.csv"), "--query-preference", str(tables / "q.csv")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "blocked" in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert list(tables.iterdir()) == []
    # a previous set of outputs stays whole
    args[args.index("--out") + 1] = str(tables / "m.json")
    assert CliRunner().invoke(main, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in tables.iterdir()}
    assert set(before) == {"m.json", "m_details.json", "ap.csv", "ap.png", "q.csv"}
    (tmp_path / "other").write_text("")
    args[args.index("--out") + 1] = str(tmp_path / "other" / "m.json")
    assert CliRunner().invoke(main, args).exit_code == 1
    assert {p.name: p.read_bytes() for p in tables.iterdir()} == before


def test_reference_protocol_ranks_fp32_sigmoids(run, tmp_path):
    data, ckpt = run
    ref = EvaluateConfig(top_k=[3, 5], protocol="reference")
    report = evaluate(
        data.test, data.labels, tmp_path / "m.json", checkpoint=ckpt, params=ref, **QUIET
    )
    scores, labels = _logits(data, ckpt)
    expected = evaluate_scores(reference_scores(scores), labels, data.num_seen, [3, 5], "reference")
    assert report["protocol"] == "reference"
    for setting in ("zsl", "gzsl", "seen"):
        assert report[setting]["mAP"] == pytest.approx(expected[setting]["mAP"], rel=1e-12)
        assert report[setting]["f1@5"] == pytest.approx(expected[setting]["f1@5"], rel=1e-12)


def test_score_rows_covers_valid_rows_only(tmp_path):
    data = make_synthetic(tmp_path, num_train=40, num_test=8, invalid_train=(1, 39))
    loader = open_loader(open_cache(data.train), batch_size=16, shuffle=False)
    pred = score_rows(lambda t: t[:, 0, :3].float(), loader, torch.device("cpu"))
    assert pred.scores.shape == (38, 3) and pred.scores.dtype == np.float32
    assert 1 not in pred.rows and 39 not in pred.rows


def test_labels_without_negatives_are_not_scored(run, tmp_path):
    """A test store whose negatives are all missing: no AP of 1.0 anywhere, one warning line, the
    counts in the JSON, the names in the per-label CSV."""
    data, ckpt = run
    test = tmp_path / "test.zarr"
    shutil.copytree(data.test, test)
    cache = open_cache(test, mode="r+")
    cache.labels[:] = np.where(cache.labels[:] == -1, 0, cache.labels[:])
    lines: list[str] = []
    report = evaluate(
        test,
        data.labels,
        tmp_path / "m.json",
        checkpoint=ckpt,
        baseline="clip",
        params=EVAL,
        per_label=tmp_path / "ap.csv",
        device="cpu",
        echo=lines.append,
    )
    for m in (report[s] for s in ("zsl", "gzsl", "seen")):
        assert (
            m["mAP"] is None
            and m["num_labels_scored"] == 0
            and m["labels_without_negative"] == m["num_labels"]
        )
    assert report["clip_zero_shot"]["zsl"]["mAP"] is None
    rows = list(csv.DictReader(open(tmp_path / "ap.csv")))
    assert {r["lacks"] for r in rows} == {"negative"} and not any(r["ap"] == "1.0" for r in rows)
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert (
        len(warnings) == 1 and "GZSL 0/12" in warnings[0] and "left out of every mAP" in warnings[0]
    )


def test_validation_without_scorable_labels_is_refused(tmp_path):
    data = make_synthetic(tmp_path, num_train=32, num_test=8)
    cache = open_cache(data.train, mode="r+")
    cache.labels[:] = np.where(cache.labels[:] == -1, 0, cache.labels[:])
    p = Params(
        model=ModelConfig(num_queries=2, num_layers=1, num_heads=2, ff_dim=8),
        train=TrainConfig(epochs=1),
    )
    with pytest.raises(
        QKSError, match="no seen label of the held-out rows .* has both a positive and a negative"
    ):
        train(
            data.train,
            data.labels,
            tmp_path / "out",
            params=p,
            progress_bar=False,
            echo=lambda _: None,
        )
    assert not (tmp_path / "out").exists()


def test_stores_of_the_other_split_are_refused(run, tmp_path):
    data, ckpt = run
    cli = _evaluate_args(ckpt, data.train, data.labels, tmp_path / "m.json")
    result = CliRunner().invoke(main, cli)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        result.output.count("\n") == 1
        and "a train store" in result.output
        and "--any-split" in result.output
    )
    assert CliRunner().invoke(main, [*cli, "--any-split"]).exit_code == 0
    cli = [
        "train",
        "--train-cache",
        str(data.test),
        "--labels",
        str(data.labels),
        "--out",
        str(tmp_path / "t"),
    ]
    result = CliRunner().invoke(main, cli)
    assert (
        result.exit_code == 1
        and result.output.count("\n") == 1
        and "leaks the test set" in result.output
    )


def test_stale_checkpoint_labels_or_template_pool_refused(run, tmp_path):
    data, ckpt = run
    other = make_synthetic(tmp_path, num_train=16, num_test=16, backbone={"model": "ViT-L-14"})
    with pytest.raises(QKSError, match=r"vs checkpoint.*model is 'ViT-L-14'"):
        evaluate(other.test, other.labels, tmp_path / "m.json", checkpoint=ckpt, params=EVAL)
    with pytest.raises(QKSError, match="label store"):
        evaluate(data.test, other.labels, tmp_path / "m.json", checkpoint=ckpt, params=EVAL)
    shutil.copytree(ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["label_embedding"] |= {"num_templates": 85, "templates_sha256": "ab" * 32}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        QKSError, match="labels embedded otherwise than the checkpoint's .num_templates None vs 85"
    ):
        evaluate(
            data.test, data.labels, tmp_path / "m.json", checkpoint=tmp_path / "ckpt", params=EVAL
        )


def test_selection_on_test_reaches_the_metrics(run, tmp_path):
    data, ckpt = run
    shutil.copytree(ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config | {"selection": "test"}))
    result = CliRunner().invoke(
        main, _evaluate_args(tmp_path / "ckpt", data.test, data.labels, tmp_path / "m.json")
    )
    assert result.exit_code == 0, result.output
    assert SELECTED_ON_TEST in result.output
    written = json.loads((tmp_path / "m_details.json").read_text())
    assert written["selection"] == "test" and written["warning"] == SELECTED_ON_TEST


def test_embed_labels_stores_the_clip_baselines_template(sample_dataset, tiny_clip, tmp_path):
    from qks_pipeline.stage_one.extract import CLIP_TEMPLATE, embed_labels

    config, weights = tiny_clip
    backbone = BackboneConfig(model=str(config), pretrained=str(weights))
    embed_labels(
        sample_dataset.dataset,
        sample_dataset.templates,
        tmp_path / "l.zarr",
        backbone=backbone,
        labels=LabelsConfig(),
        device="cpu",
    )
    names, clip, attrs = read_label_embeddings(tmp_path / "l.zarr", CLIP_EMBEDDINGS)
    bb = load_backbone(str(config), str(weights))
    with torch.no_grad():
        text = bb.model.encode_text(bb.tokenizer([CLIP_TEMPLATE.format(n) for n in names])).float()
    np.testing.assert_allclose(
        clip, torch.nn.functional.normalize(text, dim=-1).numpy(), rtol=1e-5, atol=1e-6
    )
    assert attrs["clip_template"] == CLIP_TEMPLATE == "There is a {} in the scene"
    assert attrs["num_templates"] == len(sample_dataset.templates.read_text().splitlines())


def test_import_reference_checkpoint(tiny_clip, tmp_path):
    config_json, _ = tiny_clip
    d, e = 64, 32  # the tiny CLIP's width and embedding size
    clip_state = load_backbone(str(config_json), "none").model.state_dict()
    raw = random_reference_state(2, 3, d, e, 16, seed=1)
    raw |= {f"clip_model.{k}": v for k, v in clip_state.items() if k != "visual.proj"}
    torch.save(raw, tmp_path / "ref.pth")
    result = CliRunner().invoke(
        main,
        [
            "import-checkpoint",
            str(tmp_path / "ref.pth"),
            "--out",
            str(tmp_path / "ck"),
            "--model",
            str(config_json),
            "--num-heads",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    expected = load_backbone(str(config_json), str(tmp_path / "ck" / "clip_weights.pt")).fingerprint
    assert config["fingerprint"] == expected and config["selection"] == "test"
    model, _ = load_checkpoint(tmp_path / "ck", torch.device("cpu"))
    assert model.cfg.num_queries == 3 and len(model.layers) == 2
    torch.testing.assert_close(model.proj.detach(), raw["proj"])
    # a store extracted with that backbone is accepted by evaluate
    data = make_synthetic(
        tmp_path / "data", num_train=8, num_test=24, dim=d, embed_dim=e, backbone=expected
    )
    report = evaluate(
        data.test,
        data.labels,
        tmp_path / "m.json",
        checkpoint=tmp_path / "ck",
        params=EVAL,
        **QUIET,
    )
    assert report["selection"] == "test" and _in_unit_interval(report["zsl"])


def test_selection_on_test_equals_the_reference_protocol(tmp_path):
    """`selection: test` selects on the `protocol: reference` metrics: ZSL mAP + F1@3 + F1@5."""
    data = make_synthetic(tmp_path, num_train=64, num_test=32)
    model = ModelConfig(num_queries=2, num_layers=1, num_heads=2, ff_dim=16)
    p = Params(
        model=model,
        train=TrainConfig(epochs=2, batch_size=16, lr=1e-3, selection="test", val_fraction=0),
    )
    train(
        data.train,
        data.labels,
        tmp_path / "ck",
        params=p,
        test_path=data.test,
        progress_bar=False,
        echo=QUIET["echo"],
    )
    best = json.loads((tmp_path / "ck" / "config.json").read_text())["best"]
    ref = EvaluateConfig(top_k=[3, 5], protocol="reference")
    zsl = evaluate(
        data.test, data.labels, tmp_path / "m.json", checkpoint=tmp_path / "ck", params=ref, **QUIET
    )["zsl"]
    assert best["score"] == pytest.approx(zsl["mAP"] + zsl["f1@3"] + zsl["f1@5"], rel=1e-12)


def test_two_evaluations_in_one_folder_keep_their_own_tables(run, tmp_path):
    """The query table is named after --out, the per-label AP plot after the per-label CSV."""
    data, ckpt = run
    for name in ("a", "b"):
        args = _evaluate_args(ckpt, data.test, data.labels, tmp_path / f"{name}.json")
        result = CliRunner().invoke(main, [*args, "--per-label", str(tmp_path / f"{name}_ap.csv")])
        assert result.exit_code == 0, result.output
    made = {p.name for p in tmp_path.iterdir()}
    tables = (".json", "_details.json", ".query_preference.csv", "_ap.csv", "_ap.png")
    assert made == {f"{n}{s}" for n in "ab" for s in tables}
