"""Tagging new images (`qks predict`, `Tagger`): agreement with the evaluation path, the
label-embedding cache, the backbone check, outputs, and bad input. Built on the tiny open_clip model
through the real extract and train paths."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from qks_pipeline.cli import main
from qks_pipeline.cli.predict import SKIPPED, find_images, walk_images
from qks_pipeline.config import ModelConfig, Params, TrainConfig
from qks_pipeline.data.images import load_rgb
from qks_pipeline.errors import QKSError
from qks_pipeline.predict import tagger as predict_module
from qks_pipeline.predict.tagger import TEMPLATES, Tagger, clean_labels, prompt_pool
from qks_pipeline.stage_one.backbone import file_sha256, load_backbone, visual_tokens
from qks_pipeline.stage_two.checkpoint import load as load_checkpoint
from qks_pipeline.stage_two.inputs import open_inputs
from qks_pipeline.stage_two.loader import open_loader
from qks_pipeline.stage_two.scoring import model_scorer, score_rows
from qks_pipeline.stage_two.train import train
from qks_pipeline.store.label_store import read_label_embeddings
from tests.tiny import embed_args, extract_args

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _qks(*args: object, expect: int = 0) -> tuple[str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output + result.stderr
    return result.stdout, result.stderr


@pytest.fixture(autouse=True)
def label_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own label-embedding cache (never the user's ~/.cache)."""
    monkeypatch.setenv("QKS_CACHE_DIR", str(tmp_path / "qks-cache"))
    return tmp_path / "qks-cache" / "label_embeddings"


@pytest.fixture(scope="module")
def run(sample_dataset, tiny_clip, tmp_path_factory):
    """Train and test caches of the sample (real extract), label embeddings, a 2-epoch run."""
    root = tmp_path_factory.mktemp("predict")
    ds = sample_dataset
    for split in ("train", "test"):
        _qks(*extract_args(ds, tiny_clip, root / f"{split}.zarr", split, shard_size=8))
    _qks(*embed_args(ds, tiny_clip, root / "labels.zarr"))
    p = Params(
        model=ModelConfig(num_queries=4, num_layers=1, num_heads=4, ff_dim=32),
        train=TrainConfig(epochs=2, batch_size=8, lr=1e-3, val_fraction=0.25),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(
        root / "train.zarr",
        root / "labels.zarr",
        root / "ckpt",
        params=p,
        device="cpu",
        progress_bar=False,
        echo=lambda _: None,
    )
    torch.set_num_threads(threads)
    return root


@pytest.fixture
def tagger(run, tiny_clip, sample_dataset) -> Tagger:
    config, weights = tiny_clip
    return Tagger.load(
        run / "ckpt", "cpu", str(weights), model=str(config), templates=sample_dataset.templates
    )


def _predict_args(run: Path, tiny_clip, sample_dataset, *extra: object) -> list[object]:
    config, weights = tiny_clip
    return [
        "predict",
        "--checkpoint",
        run / "ckpt",
        "--model",
        config,
        "--pretrained",
        weights,
        "--templates",
        sample_dataset.templates,
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------- agreement with stage one and evaluation


def test_scores_equal_the_evaluation_path_on_the_cached_test_split(run, tagger, sample_dataset):
    model, config = load_checkpoint(run / "ckpt", CPU)
    inputs = open_inputs(run / "test.zarr", run / "labels.zarr", role="test")
    loader = open_loader(inputs.cache, batch_size=8, shuffle=False)
    # (N, C)
    expected = score_rows(model_scorer(model, torch.from_numpy(inputs.embeddings)), loader, CPU)
    paths = [sample_dataset.images / p for p in inputs.cache.paths[:][expected.rows]]
    got = tagger.predict(paths, inputs.label_names, top_k=3, batch_size=3)
    logits = np.stack([p.logits for p in got])  # (N, C)
    # The label embeddings are stage one's, computed the same way.
    np.testing.assert_allclose(
        tagger.label_embeddings(inputs.label_names).numpy(), inputs.embeddings, rtol=1e-5, atol=1e-5
    )
    # The cache stores tokens in float16: a relative rounding error of at most 2^-11 (4.9e-4) per
    # element. The head (LayerNorms, softmax attention, a max over queries) does not amplify a small
    # relative input error much, so we allow 4x that unit of the logits' spread (measured: about
    # 5e-5 of it). Sigmoid scores: atol 1e-2 (issue #6).
    spread = float(expected.scores.std())
    np.testing.assert_allclose(logits, expected.scores, rtol=0, atol=2e-3 * spread)
    np.testing.assert_allclose(
        np.stack([p.scores for p in got]), 1 / (1 + np.exp(-expected.scores)), atol=1e-2
    )
    # Rounding our own tokens to float16 removes the only difference: then the two paths agree to
    # float32 precision.
    pixels = torch.stack([tagger.backbone.preprocess(load_rgb(p)) for p in paths])  # (N, 3, H, W)
    tokens = visual_tokens(tagger.backbone.model, pixels).half()  # (N, T, D)
    with torch.no_grad():
        rounded = tagger.head(tokens, tagger.label_embeddings(inputs.label_names)).numpy()
    np.testing.assert_allclose(rounded, expected.scores, rtol=1e-4, atol=1e-4)


def test_a_head_trained_on_normalised_label_means_gets_them_at_prediction(
    run, tiny_clip, sample_dataset, tmp_path
):
    """`labels.normalize: true` at stage one is recorded in the checkpoint, and predict embeds
    labels the same way."""
    config, weights = tiny_clip
    labels = tmp_path / "labels_normalised.zarr"
    _qks(*embed_args(sample_dataset, tiny_clip, labels, "labels.normalize=true"))
    p = Params(
        model=ModelConfig(num_queries=4, num_layers=1, num_heads=4, ff_dim=32),
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-3, val_fraction=0.25),
    )
    train(
        run / "train.zarr",
        labels,
        tmp_path / "ckpt",
        params=p,
        device="cpu",
        progress_bar=False,
        echo=lambda _: None,
    )
    tagger = Tagger.load(
        tmp_path / "ckpt",
        "cpu",
        str(weights),
        model=str(config),
        templates=sample_dataset.templates,
    )
    names, stored, _ = read_label_embeddings(labels)
    assert tagger.normalize_labels
    np.testing.assert_allclose(tagger.label_embeddings(names).numpy(), stored, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, rtol=1e-5)


def test_top_k_and_threshold_follow_the_scores(tagger, sample_dataset):
    images = find_images([sample_dataset.images / "test"])
    labels = sample_dataset.seen + sample_dataset.unseen
    for p in tagger.predict(images, labels, top_k=3, threshold=0.4):
        order = np.argsort(-p.scores, kind="stable")
        assert [label for label, _ in p.top] == [labels[j] for j in order[:3]]
        assert [s for _, s in p.top] == sorted((s for _, s in p.top), reverse=True)
        assert {label for label, _ in p.above} == {
            labels[j] for j in range(len(labels)) if p.scores[j] > 0.4
        }
        assert p.scores_by_label[p.top[0][0]] == pytest.approx(p.scores.max())
        np.testing.assert_allclose(
            p.scores, 1 / (1 + np.exp(-p.logits.astype(np.float64))), rtol=1e-6
        )


def test_in_memory_images_equal_files(tagger, sample_dataset):
    files = find_images([sample_dataset.images / "test"])[:3]
    from_files = tagger.predict(files, ["red", "circle"])
    in_memory = [Image.open(f) for f in files]
    # converted back to RGB (alpha is opaque: the same pixels)
    in_memory[0] = in_memory[0].convert("RGBA")
    from_memory = tagger.predict(in_memory, ["red", "circle"])
    for a, b in zip(from_files, from_memory, strict=True):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    # PIL's file name, if any
    assert from_memory[1].image == str(files[1]) and from_memory[0].image == "<image 0>"
    assert tagger.predict([Image.new("RGB", (70, 50), "red")], ["red"])[0].image == "<image 0>"


def test_default_prompt_pool_is_the_package_file_that_dvc_reads():
    assert TEMPLATES == REPO / "qks_pipeline" / "templates.txt" and len(prompt_pool()) == 85
    assert f"--templates {TEMPLATES.relative_to(REPO)} " in (REPO / "dvc.yaml").read_text()


# ---------------------------------------------------------------- the label-embedding cache


def test_label_embeddings_are_cached_per_label(tagger, label_cache, monkeypatch):
    first = tagger.label_embeddings(["red", "blue"]).numpy()
    assert len(list(label_cache.glob("*.npy"))) == 2

    def must_not_encode(*_args, **_kw):
        raise AssertionError("encoded although cached")

    with monkeypatch.context() as m:
        m.setattr(predict_module, "encode_labels", must_not_encode)
        np.testing.assert_array_equal(tagger.label_embeddings(["blue", "red"]).numpy(), first[::-1])
    both = tagger.label_embeddings(["red", "green"]).numpy()  # one cached, one new
    np.testing.assert_array_equal(both[0], first[0])
    assert len(list(label_cache.glob("*.npy"))) == 3
    for f in label_cache.glob("*.npy"):  # damaged files are recomputed, not trusted
        f.write_bytes(b"garbage")
    np.testing.assert_allclose(tagger.label_embeddings(["red", "blue"]).numpy(), first, rtol=1e-6)
    # other templates: other keys
    other = Tagger(**{**tagger.__dict__, "templates": ["a sketch of a {}."]})
    assert not np.allclose(other.label_embeddings(["red"]).numpy(), first[:1])
    assert len(list(label_cache.glob("*.npy"))) == 4


# ---------------------------------------------------------------- the CLI, outputs and bad input


def test_cli_writes_jsonl_csv_and_html_and_skips_unreadable_images(
    run, tiny_clip, sample_dataset, tmp_path
):
    images = tmp_path / "images"
    shutil.copytree(sample_dataset.images / "test", images)
    (images / "sub").mkdir()
    (images / "sub" / "empty.jpg").write_bytes(b"")
    (images / "junk.png").write_bytes(b"\x89PNG not really")
    (images / "notes.txt").write_text("not an image, not walked")
    (images / ".hidden.jpg").write_bytes(b"")
    out, table, page = tmp_path / "p.jsonl", tmp_path / "p.csv", tmp_path / "p.html"
    args = _predict_args(
        run,
        tiny_clip,
        sample_dataset,
        "--labels",
        "red, green, red, triangle, , blue",
        "--top-k",
        2,
        "--threshold",
        0.3,
        "--out",
        out,
        "--csv",
        table,
        "--html",
        page,
        "--batch-size",
        4,
        images,
    )
    _, err = _qks(*args)
    assert "note: repeated label(s) removed (equal to one before, up to case): red" in err
    assert f"skipped {images / 'junk.png'}: not a readable image format" in err
    assert f"skipped {images / 'sub' / 'empty.jpg'}: empty file" in err
    assert "8 image(s) tagged with 4 labels, 2 skipped" in err
    records = _jsonl(out)
    expected = sorted(
        [p.name for p in sample_dataset.images.glob("test/*")] + ["junk.png", "sub/empty.jpg"]
    )
    assert [Path(r["image"]).relative_to(images).as_posix() for r in records] == expected
    skipped = {Path(r["image"]).name: r["skipped"] for r in records if "skipped" in r}
    assert skipped == {"junk.png": "not a readable image format", "empty.jpg": "empty file"}
    for r in records:
        if "skipped" not in r:
            assert len(r["top"]) == 2 and {t["label"] for t in r["top"]} <= {
                "red",
                "green",
                "triangle",
                "blue",
            }
            assert all(t["score"] > 0.3 for t in r["above_threshold"])
    rows = list(csv.DictReader(open(table)))
    tagged = [r for r in records if "skipped" not in r]
    listed = sum(
        len({t["label"] for t in r["top"]} | {t["label"] for t in r["above_threshold"]})
        for r in tagged
    )
    assert len(rows) == listed + 2 and {r["skipped"] for r in rows} - {""} == set(skipped.values())
    first = next(r for r in rows if r["image"] == tagged[0]["image"] and r["rank"] == "1")
    assert (
        first["label"] == tagged[0]["top"][0]["label"]
        and float(first["score"]) == tagged[0]["top"][0]["score"]
    )
    html = page.read_text()
    assert (
        html.count('<figure class="card"') == 8 and html.count('<figure class="card skipped"') == 2
    )


def test_cli_jsonl_to_stdout_with_all_scores(run, tiny_clip, sample_dataset):
    image = sorted((sample_dataset.images / "test").iterdir())[0]
    out, _ = _qks(
        *_predict_args(
            run, tiny_clip, sample_dataset, "--labels", "red,blue", "--all-scores", image
        )
    )
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert set(record["scores"]) == {"red", "blue"} and record["image"] == str(image)


def test_label_lists(tmp_path):
    assert clean_labels([" red ", "big  red car", "red", "", "Red", "big red car"]) == (
        ["red", "big red car"],
        ["red", "Red", "big red car"],
    )
    for empty in ([], ["", "  "]):
        with pytest.raises(QKSError, match="label list is empty"):
            clean_labels(empty)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--labels", " , ,"], "the label list is empty"),
        (["--labels-file", "EMPTY"], "the label list is empty"),
        (["--labels-file", "MISSING"], "label file not found"),
        (["--labels-file", "DIR"], "not a file (one label a line expected)"),
        (
            ["--labels", "red", "--labels-file", "EMPTY"],
            "give at most one of --labels and --labels-file",
        ),
    ],
)
def test_bad_label_options(run, tiny_clip, sample_dataset, tmp_path, options, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    options = [
        {
            "EMPTY": str(tmp_path / "empty.txt"),
            "MISSING": str(tmp_path / "nope.txt"),
            "DIR": str(tmp_path),
        }.get(o, o)
        for o in options
    ]
    result = CliRunner().invoke(
        main, list(map(str, _predict_args(run, tiny_clip, sample_dataset, *options, "x.jpg")))
    )
    assert result.exit_code in (1, 2) and message in result.output


def test_labels_file_with_duplicates(run, tiny_clip, sample_dataset, tmp_path):
    (tmp_path / "labels.txt").write_text("red\nblue\n\nred\nRed\n BLUE \n")
    image = sorted((sample_dataset.images / "test").iterdir())[0]
    out, err = _qks(
        *_predict_args(
            run, tiny_clip, sample_dataset, "--labels-file", tmp_path / "labels.txt", image
        )
    )
    # CLIP lowercases: labels equal up to case are one label, the first spelling kept
    assert "repeated label(s) removed (equal to one before, up to case): red, Red, BLUE" in err
    assert sorted(t["label"] for t in json.loads(out)["top"]) == ["blue", "red"]


def test_clean_labels_merges_labels_equal_up_to_case():
    assert clean_labels(["Dog", "cat", "dog", " DOG ", "hot  dog", "Hot Dog"]) == (
        ["Dog", "cat", "hot dog"],
        ["dog", "DOG", "Hot Dog"],
    )


def test_new_labels_are_embedded_with_a_progress_bar(run, tiny_clip, sample_dataset):
    image = sorted((sample_dataset.images / "test").iterdir())[0]
    args = _predict_args(run, tiny_clip, sample_dataset, "--labels", "red, blue", image)
    _, err = _qks(*[a for a in args if a != "--no-progress"], "--progress")
    assert "embed labels: 100%" in err and "2/2" in err
    # cached now: nothing to embed, and no bar without --progress
    _, err = _qks(*_predict_args(run, tiny_clip, sample_dataset, "--labels", "red, green", image))
    assert "embed labels" not in err


def _error(args: list[object]) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines  # one clear line
    return lines[0]


def test_missing_or_broken_checkpoint(run, tiny_clip, sample_dataset, tmp_path):
    base = _predict_args(
        run, tiny_clip, sample_dataset, "--labels", "red", sample_dataset.images / "test"
    )
    at = base.index("--checkpoint") + 1
    for ckpt, message in [
        (tmp_path / "nope", "checkpoint directory not found"),
        (tmp_path, "config.json: not found; is this a `qks train` output directory?"),
    ]:
        assert message in _error(base[:at] + [ckpt] + base[at + 1 :])
    broken = tmp_path / "broken"
    shutil.copytree(run / "ckpt", broken)
    (broken / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _error(base[:at] + [broken] + base[at + 1 :])
    (broken / "config.json").write_text((run / "ckpt" / "config.json").read_text())
    (broken / "best.safetensors").unlink()
    assert "best.safetensors: not found" in _error(base[:at] + [broken] + base[at + 1 :])


def test_a_different_backbone_is_refused_naming_both(run, tiny_clip, sample_dataset, tmp_path):
    config, weights = tiny_clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = open_clip.create_model(config.stem, pretrained=None)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(QKSError) as e:
        Tagger.load(run / "ckpt", "cpu", str(tmp_path / "other.pt"), model=str(config))
    message = str(e.value.message)
    trained = json.loads((run / "ckpt" / "config.json").read_text())["fingerprint"][
        "weights_sha256"
    ]
    assert "backbone mismatch" in message and "differs in weights_sha256" in message
    assert trained[:12] in message and file_sha256(tmp_path / "other.pt")[:12] in message
    args = _predict_args(
        run, tiny_clip, sample_dataset, "--labels", "red", sample_dataset.images / "test"
    )
    args[args.index("--pretrained") + 1] = tmp_path / "other.pt"
    assert "backbone mismatch" in _error(args)


def test_the_checkpoint_finds_its_locally_saved_backbone_and_labels_with_no_flag(
    run, sample_dataset
):
    """`qks predict --checkpoint DIR IMAGE`: the backbone files recorded at training (config file,
    weights file), and the labels it was trained on."""
    image = sample_dataset.images / "test" / "img000.jpg"
    out, _ = _qks("predict", "--checkpoint", run / "ckpt", image)
    record = json.loads(out)
    assert record["image"] == str(image) and len(record["top"]) == 5
    assert {t["label"] for t in record["top"]} <= set(sample_dataset.seen + sample_dataset.unseen)


def _moved(run: Path, tmp_path: Path, **source: str) -> Path:
    """A copy of the checkpoint whose recorded backbone files are elsewhere."""
    ckpt = tmp_path / "moved"
    shutil.copytree(run / "ckpt", ckpt, dirs_exist_ok=True)
    config = json.loads((ckpt / "config.json").read_text())
    config["backbone_source"] |= source
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_backbone_files_not_where_recorded_are_asked_for_in_one_line(run, tiny_clip, tmp_path):
    config, weights = tiny_clip
    ckpt = _moved(
        run, tmp_path, model=str(tmp_path / "gone.json"), pretrained=str(tmp_path / "gone.pt")
    )
    with pytest.raises(
        QKSError,
        match=r"model config TinyCLIP-test.json .* is not at .*gone.json'; give .* --model",
    ):
        Tagger.load(ckpt, "cpu")
    with pytest.raises(
        QKSError, match=r"weights file \(sha256 \w+\) is not at .*gone.pt'; give .* --pretrained"
    ):
        Tagger.load(ckpt, "cpu", model=str(config))
    changed = tmp_path / "changed.pt"  # the recorded path holds other weights now
    state = torch.load(weights, weights_only=True)
    torch.save(state | {"visual.proj": state["visual.proj"] + 1}, changed)
    with pytest.raises(
        QKSError, match="backbone mismatch.*give the original with --model / --pretrained"
    ):
        Tagger.load(_moved(run, tmp_path, pretrained=str(changed)), "cpu")


def test_exported_clip_weights_beside_the_checkpoint_are_found(run, tiny_clip, tmp_path):
    config, weights = tiny_clip
    ckpt = _moved(run, tmp_path, pretrained=str(tmp_path / "gone.pt"))
    shutil.copy(weights, ckpt / "clip_weights.pt")  # where `qks import-checkpoint` puts them
    loaded = Tagger.load(ckpt, "cpu").backbone.model.state_dict()
    expected = load_backbone(str(config), str(weights)).model.state_dict()
    assert loaded.keys() == expected.keys() and all(
        torch.equal(loaded[k], expected[k]) for k in loaded
    )


def test_walking_a_folder_counts_what_it_skips(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"")
    (photos / "sub" / "b.png").write_bytes(b"")
    (photos / "x.jpg").mkdir()  # a folder named like an image
    (photos / "sub" / "loop").symlink_to("..")  # a link to a folder above: a loop
    (photos / "self.jpg").symlink_to("self.jpg")  # a link to itself
    (photos / "gone.png").symlink_to("nowhere.png")  # a broken link
    (photos / "notes.txt").write_text("not an image, not counted")
    notes = []
    found = find_images([photos], notes.append)
    assert [p.relative_to(photos).as_posix() for p in found] == ["a.jpg", "sub/b.png"]
    assert notes == [f"note: {photos}: 4 entries skipped ({SKIPPED})"]
    assert walk_images(photos / "sub") == ([photos / "sub" / "b.png"], 1)


def test_find_images_walks_sorted_and_keeps_missing_files(tmp_path):
    for name in ["b/z.PNG", "a.jpg", "b/a.webp", "c.txt", ".git/x.jpg", "d.TIFF"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_images([tmp_path, tmp_path / "missing.jpg"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.jpg",
        "b/a.webp",
        "b/z.PNG",
        "d.TIFF",
        "missing.jpg",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(QKSError, match="no image files"):
        find_images([tmp_path / "empty"])


def test_every_image_unreadable_is_an_error_after_writing_the_record(
    run, tiny_clip, sample_dataset, tmp_path
):
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    out = tmp_path / "p.jsonl"
    args = _predict_args(
        run, tiny_clip, sample_dataset, "--labels", "red", "--out", out, tmp_path / "bad.jpg"
    )
    assert "no image could be read" in CliRunner().invoke(main, list(map(str, args))).output
    assert _jsonl(out) == [
        {"image": str(tmp_path / "bad.jpg"), "skipped": "not a readable image format"}
    ]


def test_a_closed_pipe_ends_predict_quietly(run, sample_dataset):
    """`qks predict ... | head -1`: the reader goes away; no error and no traceback, SIGPIPE's
    status as Unix tools."""
    cmd = [
        sys.executable,
        "-m",
        "qks_pipeline.cli",
        "predict",
        "--checkpoint",
        str(run / "ckpt"),
        "--labels",
        "red",
    ]
    cmd += ["--templates", str(sample_dataset.templates), "--device", "cpu", "--no-progress"]
    cmd += [str(sample_dataset.images / "test")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the first record: every write finds the pipe closed
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 141 and stderr.decode().strip() == ""


def test_max_pixels_skips_larger_images_with_the_numbers_and_raising_it_tags_them(
    run, sample_dataset, monkeypatch
):
    # restored: the limit is process-wide
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    image = sample_dataset.images / "test" / "img000.jpg"
    pixels = Image.open(image).width * Image.open(image).height
    base = [
        "--checkpoint",
        run / "ckpt",
        "--labels",
        "red",
        "--templates",
        sample_dataset.templates,
        "--device",
        "cpu",
    ]
    base += ["--no-progress", image]
    result = CliRunner().invoke(
        main, ["predict", *map(str, base), "--max-pixels", str(pixels // 2)]
    )
    reason = (
        f"decompression bomb: {pixels:,} pixels, above the limit of {pixels // 2:,} "
        "(raise it with --max-pixels N)"
    )
    assert json.loads(result.stdout) == {"image": str(image), "skipped": reason}
    out, _ = _qks("predict", *base, "--max-pixels", pixels)
    # tagged at a limit of exactly its size
    assert [t["label"] for t in json.loads(out)["top"]] == ["red"]


def test_the_head_and_ranking_run_in_float32_under_autocast(tagger, sample_dataset, monkeypatch):
    """With --amp only the backbone runs in low precision; CPU bfloat16 autocast plays CUDA's."""
    files = [sample_dataset.images / "test" / "img000.jpg"]
    label_emb = tagger.label_embeddings(["red", "blue"])
    pixels = torch.stack([tagger.backbone.preprocess(load_rgb(f)) for f in files])

    def cpu_autocast(device, dtype):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None)

    monkeypatch.setattr(predict_module, "autocast", cpu_autocast)
    amp = Tagger(**{**tagger.__dict__, "amp": True})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = visual_tokens(tagger.backbone.model, pixels)  # (1, T, D) in bfloat16
    with torch.no_grad():
        # (1, 2) the head in float32 on those tokens
        expected = tagger.head(tokens.float(), label_emb)
    got = amp.logits(pixels, label_emb)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_another_template_pool_than_the_checkpoints_is_refused_in_one_line(
    run, tiny_clip, sample_dataset, tmp_path
):
    (tmp_path / "pool.txt").write_text("a sketch of a {}.\n")
    args = [
        a
        for a in _predict_args(run, tiny_clip, sample_dataset, "--labels", "red")
        if a != sample_dataset.templates
    ]
    args.remove("--templates")
    line = _error([*args, "--templates", tmp_path / "pool.txt", "x.jpg"])
    assert (
        "labels embedded otherwise than the checkpoint's (num_templates 1 vs 3" in line
        and "--templates FILE" in line
    )
