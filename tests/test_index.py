"""The query index (`qks index`, `qks tag`, `qks search`, `qks evaluate --index`, `Index`): equal to
the head, streaming, resumable, and bad input refused in one line. On the sample images with the
tiny backbone through the real extract and train paths, and on synthetic stores."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from qks_pipeline.cli import main
from qks_pipeline.config import IndexConfig, ModelConfig, Params, TrainConfig
from qks_pipeline.errors import QKSError
from qks_pipeline.index import store as index_store
from qks_pipeline.index.build import build_index
from qks_pipeline.index.index import Index, top_labels
from qks_pipeline.index.store import open_index
from qks_pipeline.index.verify import verify_index
from qks_pipeline.predict.tagger import rank
from qks_pipeline.stage_two.checkpoint import BEST
from qks_pipeline.stage_two.checkpoint import load as load_checkpoint
from qks_pipeline.stage_two.evaluate import read_report
from qks_pipeline.stage_two.loader import open_loader
from qks_pipeline.stage_two.scoring import model_scorer, score_rows
from qks_pipeline.stage_two.train import train
from qks_pipeline.store.features import open_cache
from qks_pipeline.store.label_store import read_label_embeddings
from qks_pipeline.store.synthetic import make_synthetic
from tests.tiny import embed_args, extract_args

CPU = torch.device("cpu")
TINY_HEAD = ModelConfig(num_queries=4, num_layers=1, num_heads=4, ff_dim=32)
# what `qks evaluate --index` may differ by from `--checkpoint`, per precision of z
TOLERANCE = {"fp16": 1e-4, "fp32": 1e-6}


def qks(*args: object, expect: int = 0) -> tuple[str, str]:
    """Run `qks ARGS` here; its exit code must be `expect`; returns (stdout, stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output + result.stderr
    return result.stdout, result.stderr


def _train(train_store: Path, labels: Path, out: Path, batch_size: int, seed: int = 0) -> Path:
    p = Params(
        model=TINY_HEAD,
        train=TrainConfig(epochs=2, batch_size=batch_size, lr=1e-3, val_fraction=0.25, seed=seed),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(train_store, labels, out, params=p, device="cpu", progress_bar=False, echo=lambda _: None)
    torch.set_num_threads(threads)
    return out


@dataclass(frozen=True)
class SampleRun:
    root: Path
    images: Path  # the image root
    test: Path  # the test feature store (2 shards of 4 images)
    labels: Path  # the label store
    checkpoint: Path
    index: Path  # the test store's index, fp16


def build_sample(root: Path, sample_dataset, tiny_clip) -> SampleRun:
    """The sample's feature stores (tiny backbone), label store, a 2-epoch head and the test
    store's index, all through the real commands."""
    ds = sample_dataset
    for split in ("train", "test"):
        qks(*extract_args(ds, tiny_clip, root / f"{split}.zarr", split, shard_size=4))
    qks(*embed_args(ds, tiny_clip, root / "labels.zarr"))
    checkpoint = _train(root / "train.zarr", root / "labels.zarr", root / "ckpt", batch_size=8)
    index = root / "test_index.zarr"
    qks(
        "index",
        "--checkpoint",
        checkpoint,
        "--cache",
        root / "test.zarr",
        "--out",
        index,
        "--device",
        "cpu",
        "--no-progress",
    )
    return SampleRun(root, ds.images, root / "test.zarr", root / "labels.zarr", checkpoint, index)


@pytest.fixture(autouse=True)
def label_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own label-embedding cache (never the user's ~/.cache)."""
    monkeypatch.setenv("QKS_CACHE_DIR", str(tmp_path / "qks-cache"))
    return tmp_path / "qks-cache" / "label_embeddings"


@pytest.fixture(scope="module")
def sample(sample_dataset, tiny_clip, tmp_path_factory) -> SampleRun:
    return build_sample(tmp_path_factory.mktemp("index_sample"), sample_dataset, tiny_clip)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Synthetic stores of 96 / 48 images in shards of 16 (a few unreadable training images) and a
    head trained on them."""
    root = tmp_path_factory.mktemp("index_synthetic")
    data = make_synthetic(root, num_train=96, num_test=48, shard_size=16, invalid_train=(3, 40))
    return data, _train(data.train, data.labels, root / "ckpt", batch_size=16)


def _metrics(path: Path) -> dict[str, float]:
    """Every number of a metrics JSON and its details file, by setting.key."""
    report = read_report(path)
    return {
        f"{s}.{k}": v
        for s in ("zsl", "gzsl", "seen")
        for k, v in report[s].items()
        if isinstance(v, (int, float))
    }


def _head_logits(checkpoint: Path, store: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """The head's logits over the store's valid rows, as `qks evaluate` computes them, and rows."""
    model, _ = load_checkpoint(checkpoint, CPU)
    emb = torch.from_numpy(read_label_embeddings(labels)[1])
    loader = open_loader(open_cache(store), batch_size=16, shuffle=False)
    pred = score_rows(model_scorer(model, emb), loader, CPU)
    return pred.scores, pred.rows


# ---------------------------------------------------------------- equal to the head


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_evaluate_from_the_index_equals_evaluate_from_the_checkpoint(sample, tmp_path, precision):
    index = tmp_path / f"{precision}.zarr"
    qks(
        "index",
        "--checkpoint",
        sample.checkpoint,
        "--cache",
        sample.test,
        "--out",
        index,
        "--device",
        "cpu",
        "--no-progress",
        "--set",
        f"index.precision={precision}",
    )
    common = ["--labels", sample.labels, "--device", "cpu"]
    qks(
        "evaluate",
        "--checkpoint",
        sample.checkpoint,
        "--test-cache",
        sample.test,
        *common,
        "--out",
        tmp_path / "head.json",
        "--per-label",
        tmp_path / "head.csv",
    )
    out, _ = qks(
        "evaluate",
        "--index",
        index,
        *common,
        "--out",
        tmp_path / "index.json",
        "--per-label",
        tmp_path / "index.csv",
    )
    head, from_index = _metrics(tmp_path / "head.json"), _metrics(tmp_path / "index.json")
    assert head.keys() == from_index.keys() and len(head) > 20
    worst = max(abs(head[k] - from_index[k]) for k in head)
    assert worst <= TOLERANCE[precision], (worst, precision)
    assert "ZSL     qks" in out and "query preference (4 queries)" in out
    # the same tables: per label and the query preference beside the JSON
    for table in ("csv", "query_preference.csv"):
        a = list(csv.DictReader(open(tmp_path / f"head.{table}")))
        b = list(csv.DictReader(open(tmp_path / f"index.{table}")))
        assert [r["label"] for r in a] == [r["label"] for r in b] and len(a) == 7
    assert (tmp_path / "index.png").is_file()  # the per-label plot, as for the checkpoint


def test_logits_equal_the_head_on_a_synthetic_store(synthetic, tmp_path):
    data, checkpoint = synthetic
    expected, rows = _head_logits(checkpoint, data.test, data.labels)
    names, emb, _ = read_label_embeddings(data.labels)
    spread = float(np.abs(expected).max())
    for precision, atol in (("fp32", 1e-6), ("fp16", 1e-4)):
        path = tmp_path / f"{precision}.zarr"
        build_index(checkpoint, data.test, path, params=IndexConfig(precision=precision))
        got = Index.open(path, device="cpu").logits(names, embeddings=emb)
        assert got.shape == expected.shape
        # fp16: the centred z round to 2^-11 of a remainder about 1% of z's magnitude
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol * spread)
        # any rows, any order, repeated
        pick = Index.open(path, device="cpu").logits(names, rows=[5, 2, 5], embeddings=emb)
        np.testing.assert_array_equal(pick, got[[5, 2, 5]])
    assert open_index(tmp_path / "fp16.zarr").z.dtype == np.float16


def test_another_label_split_is_one_product(synthetic, tmp_path):
    """Another seen/unseen split of the same images: scores of the same labels in another order."""
    data, checkpoint = synthetic
    build_index(checkpoint, data.test, tmp_path / "i.zarr", params=IndexConfig(precision="fp32"))
    names, emb, _ = read_label_embeddings(data.labels)
    index = Index.open(tmp_path / "i.zarr", device="cpu")
    order = np.random.default_rng(0).permutation(len(names))
    full = index.logits(names, embeddings=emb)
    np.testing.assert_array_equal(
        index.logits([names[i] for i in order], embeddings=emb[order]), full[:, order]
    )


# ---------------------------------------------------------------- tag and search


def test_tag_equals_predicts_ranking_and_skips_unreadable_images(synthetic, tmp_path):
    data, checkpoint = synthetic
    build_index(checkpoint, data.train, tmp_path / "train.zarr")
    names, emb, _ = read_label_embeddings(data.labels)
    index = Index.open(tmp_path / "train.zarr", device="cpu")
    got = list(index.tag(names, top_k=3, threshold=0.6, embeddings=emb))
    assert len(got) == 96 and [p.image for p in got] == list(open_cache(data.train).paths[:])
    assert [i for i, p in enumerate(got) if p.skipped] == [3, 40]
    logits = index.logits(names, embeddings=emb)  # valid rows
    for p, row_logits in zip([p for p in got if not p.skipped], logits, strict=True):
        top, above, scores = rank(names, row_logits, 3, 0.6)
        assert p.top == top and p.above == above
        np.testing.assert_array_equal(p.scores, scores)
    assert got[3].to_json() == {"image": got[3].image, "skipped": got[3].skipped}


def test_top_labels_break_ties_to_the_lower_label_as_rank_does():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1], [1.0, 1.0, 1.0, 0.2, 1.0]])
    assert [list(t) for t in top_labels(scores, 3)] == [[1, 3, 0], [0, 1, 2]]
    assert [list(t) for t in top_labels(scores, 9)] == [[1, 3, 0, 2, 4], [0, 1, 2, 4, 3]]


def test_tag_streams_one_shard_at_a_time(synthetic, tmp_path, monkeypatch):
    """The first predictions come before the second shard is read: the score matrix of all images
    is never held."""
    data, checkpoint = synthetic
    build_index(checkpoint, data.test, tmp_path / "i.zarr")
    names, emb, _ = read_label_embeddings(data.labels)
    read = []
    original = index_store.IndexStore.read_shard
    monkeypatch.setattr(
        index_store.IndexStore,
        "read_shard",
        lambda self, shard: read.append(shard) or original(self, shard),
    )
    monkeypatch.setattr(index_store, "BLOCK_ENTRIES", 4 * 12 * 5)  # blocks of 5 rows
    stream = Index.open(tmp_path / "i.zarr", device="cpu").tag(names, embeddings=emb)
    first = [next(stream) for _ in range(16)]
    assert read == [0] and len(first) == 16
    assert len(list(stream)) == 32 and read == [0, 1, 2]


def test_search_equals_the_brute_force_ranking(synthetic, tmp_path):
    data, checkpoint = synthetic
    build_index(checkpoint, data.test, tmp_path / "i.zarr")
    names, emb, _ = read_label_embeddings(data.labels)
    index = Index.open(tmp_path / "i.zarr", device="cpu")
    logits = index.logits(names, embeddings=emb)
    for labels in ([0], [8, 9], [1, 2, 11]):
        hits = index.search([names[c] for c in labels], top=7, embeddings=emb[labels])
        combined = logits[:, labels].min(axis=1)
        expected = np.lexsort((np.arange(48), -combined))[:7]
        assert [h.row for h in hits] == list(expected)
        assert [h.score for h in hits] == pytest.approx(1 / (1 + np.exp(-combined[expected])))
        assert all(h.score == min(h.scores.values()) for h in hits)
    assert len(index.search([names[0]], top=100, embeddings=emb[:1])) == 48


def test_the_commands_tag_and_search_the_sample_with_new_labels(sample, tmp_path, label_cache):
    labels = "yellow, <script>alert(1)</script>, purple hexagon"
    out, err = qks(
        "tag",
        "--index",
        sample.index,
        "--labels",
        labels,
        "--top-k",
        "2",
        "--device",
        "cpu",
        "--csv",
        tmp_path / "tags.csv",
    )
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 8 and all(len(r["top"]) == 2 for r in records)
    assert "8 image(s) tagged, 0 unreadable" in err
    assert {r["label"] for r in csv.DictReader(open(tmp_path / "tags.csv"))} <= {
        "yellow",
        "<script>alert(1)</script>",
        "purple hexagon",
    }
    assert len(list(label_cache.glob("*.npy"))) == 3  # embedded once, cached as predict caches
    # the same from Python, equal to the head on the tokens
    index = Index.open(sample.index, device="cpu")
    names = ["yellow", "purple hexagon"]
    emb = index.tagger.label_embeddings(names).numpy()
    np.testing.assert_allclose(index.logits(names), index.logits(names, embeddings=emb))
    out, err = qks(
        "search",
        "--index",
        sample.index,
        "triangle",
        "yellow",
        "--top",
        "3",
        "--html",
        tmp_path / "g.html",
        "--images",
        sample.images,
        "--device",
        "cpu",
    )
    hits = [json.loads(line) for line in out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(set(h["scores"]) == {"triangle", "yellow"} for h in hits)
    page = (tmp_path / "g.html").read_text()
    assert page.count('class="hit"') == 3 and page.count("data:image/jpeg;base64,") == 3
    assert all(h["image"] in page for h in hits) and "3 image(s) found" in err
    out, _ = qks(
        "search",
        "--index",
        sample.index,
        "<script>alert(1)</script>",
        "--top",
        "2",
        "--html",
        tmp_path / "x.html",
        "--device",
        "cpu",
    )
    page = (tmp_path / "x.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_python_api_is_exported(sample):
    from qks_pipeline import Index as Exported

    index = Exported.open(sample.index, device="cpu")
    top = list(index.tag(["red", "circle"], top_k=1))
    assert len(top) == 8 and all(p.top[0][0] in ("red", "circle") for p in top)
    assert index.logits(["red"], rows=[0, 7]).shape == (2, 1)
    assert len(index.search(["red"], top=2)) == 2


# ---------------------------------------------------------------- building: resumable, refused


def test_build_resumes_the_shards_not_done_and_equals_a_whole_run(synthetic, tmp_path):
    data, checkpoint = synthetic
    whole = build_index(checkpoint, data.test, tmp_path / "whole.zarr")
    assert (whole.computed, whole.shards_written) == (48, 3)
    path = tmp_path / "cut.zarr"
    build_index(checkpoint, data.test, path)
    (path / "done" / "00001.json").unlink()  # as a kill after shard 1's z, before its marker
    (path / "z" / "c" / "2" / "0" / "0").unlink()
    (path / "done" / "00002.json").unlink()
    again = build_index(checkpoint, data.test, path)
    assert (again.computed, again.shards_written) == (32, 2)
    np.testing.assert_array_equal(open_index(path).z[:], open_index(tmp_path / "whole.zarr").z[:])
    assert build_index(checkpoint, data.test, path).computed == 0


def test_an_index_of_another_checkpoint_or_store_is_refused_in_one_line(synthetic, tmp_path):
    data, checkpoint = synthetic
    path = tmp_path / "i.zarr"
    build_index(checkpoint, data.test, path)
    other = shutil.copytree(checkpoint, tmp_path / "other")
    model, _ = load_checkpoint(other, CPU)
    with torch.no_grad():
        model.proj.mul_(2)
    from qks_pipeline.stage_two.checkpoint import save_weights

    save_weights(model, other / BEST)
    _, err = qks(
        "index",
        "--checkpoint",
        other,
        "--cache",
        data.test,
        "--out",
        path,
        "--no-progress",
        expect=1,
    )
    assert "built from another checkpoint" in err and "--replace-stale" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(QKSError, match="query index was built differently: store"):
        build_index(checkpoint, data.train, path)
    rebuilt = build_index(other, data.test, path, replace_stale=True)
    assert rebuilt.computed == 48
    # the index now belongs to `other`: the first checkpoint cannot embed labels for it
    with pytest.raises(QKSError, match="another checkpoint than the index's"):
        _ = Index.open(path, checkpoint=checkpoint, device="cpu").tagger
    # and an existing store that is not an index is never replaced
    with pytest.raises(QKSError, match="not a query index; refusing"):
        build_index(checkpoint, data.test, data.train, overwrite=True)
    assert open_cache(data.train).num_images == 96


def test_a_truncated_shard_is_one_line(synthetic, tmp_path):
    data, checkpoint = synthetic
    path = tmp_path / "i.zarr"
    build_index(checkpoint, data.test, path)
    shard = path / "z" / "c" / "1" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:1000])
    _, err = qks(
        "evaluate", "--index", path, "--labels", data.labels, "--out", tmp_path / "m.json", expect=1
    )
    assert "index shard 1 is damaged (the wrong size)" in err
    assert len(err.strip().splitlines()) == 1 and str(shard) in err
    assert not (tmp_path / "m.json").exists()
    shard.unlink()
    names, emb, _ = read_label_embeddings(data.labels)
    with pytest.raises(QKSError, match="index shard 1 lost its z chunk; rerun `qks index`"):
        Index.open(path, device="cpu").logits(names, embeddings=emb)


# ------------------------------------------------- damaged chunks: refused in one line, or rebuilt

# a chunk of each array of the synthetic test store's index (3 shards of 16 images)
INDEX_CHUNKS = {
    "z": "z/c/1/0/0",
    "z_mean": "z_mean/c/0/0",
    "valid": "valid/c/0",
    "paths": "paths/c/1",
    "labels": "labels/c/1/0",
}


@pytest.fixture(scope="module")
def clean_index(synthetic, tmp_path_factory) -> Path:
    """An index of the synthetic test store, to copy and damage."""
    data, checkpoint = synthetic
    path = tmp_path_factory.mktemp("clean_index") / "i.zarr"
    build_index(checkpoint, data.test, path)
    return path


def _damaged(clean: Path, tmp_path: Path, key: str, kind: str) -> Path:
    """A copy of the index `clean` whose chunk `key` is "missing" or has a "flipped" bit (the last
    data byte, before the crc32c)."""
    path = shutil.copytree(clean, tmp_path / "damaged.zarr")
    if kind == "missing":
        (path / key).unlink()
    else:
        raw = bytearray((path / key).read_bytes())
        raw[-5] ^= 0x01
        (path / key).write_bytes(bytes(raw))
    return path


# what a damaged chunk is called: (kind, of z?) -> the message's words
WHY = {
    ("missing", True): "index shard 1 lost its z chunk; rerun `qks index`",
    ("missing", False): "chunk missing (deleted or never written)",
    ("flipped", True): "index shard 1 is damaged (a crc32c checksum mismatch)",
    ("flipped", False): "chunk unreadable: crc32c checksum mismatch",
}


# tag and search read no labels, evaluate no paths
READERS = {"paths": ("tag",), "labels": ("evaluate",)}


def _tag_and_search(path: Path, labels: Path) -> None:
    """What tag and search read: z, z_mean, valid and paths of every row."""
    names, emb, _ = read_label_embeddings(labels)
    index = Index.open(path, device="cpu")
    assert len(list(index.tag(names, embeddings=emb))) == index.num_images
    index.search(names[:1], top=index.num_images, embeddings=emb[:1])


@pytest.mark.parametrize("kind", ["missing", "flipped"])
@pytest.mark.parametrize("array", INDEX_CHUNKS)
def test_a_damaged_chunk_of_any_array_is_one_line_naming_it(
    synthetic, clean_index, tmp_path, array, kind
):
    data, _ = synthetic
    key = INDEX_CHUNKS[array]
    path = _damaged(clean_index, tmp_path, key, kind)
    # a missing chunk is refused on opening the index; a flipped bit where it is read
    readers = READERS.get(array, ("evaluate", "tag")) if kind == "flipped" else ("evaluate", "tag")
    expected = f"{path / key}: {WHY[kind, array == 'z']}"
    if "tag" in readers:
        with pytest.raises(QKSError) as raised:
            _tag_and_search(path, data.labels)
        assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)
    if "evaluate" in readers:
        out = tmp_path / "m.json"
        _, err = qks("evaluate", "--index", path, "--labels", data.labels, "--out", out, expect=1)
        assert err.startswith(f"Error: {expected}") and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_a_rerun_after_a_lost_z_chunk_computes_the_shard_again(synthetic, clean_index, tmp_path):
    data, checkpoint = synthetic
    path = _damaged(clean_index, tmp_path, INDEX_CHUNKS["z"], "missing")
    argv = ["index", "--checkpoint", checkpoint, "--cache", data.test, "--out", path]
    out, _ = qks(*argv, "--no-progress")
    assert "16 images in 1 shard(s)" in out and "already complete" not in out
    np.testing.assert_array_equal(open_index(path).z[:], open_index(clean_index).z[:])
    out, _ = qks(*argv, "--no-progress")
    assert "already complete" in out
    # a lost chunk of another array: refused in one line, naming it (only a rebuild writes it)
    shutil.rmtree(path)
    path = _damaged(clean_index, tmp_path, INDEX_CHUNKS["labels"], "missing")
    _, err = qks(*argv, "--no-progress", expect=1)
    assert f"{path / INDEX_CHUNKS['labels']}: chunk missing" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1


def test_an_index_of_an_older_format_is_refused_saying_to_rebuild(synthetic, clean_index, tmp_path):
    data, checkpoint = synthetic
    path = shutil.copytree(clean_index, tmp_path / "old.zarr")
    group = zarr.open_group(path, mode="r+")
    group.attrs["index"] = {**group.attrs["index"], "format_version": 1}
    message = "index format version 1, this qks reads 2; rebuild it: qks index --replace-stale"
    _, err = qks("search", "--index", path, "seen0", expect=1)
    assert f"{path}: {message}" in err and len(err.strip().splitlines()) == 1
    argv = ["index", "--checkpoint", checkpoint, "--cache", data.test, "--out", path]
    _, err = qks(*argv, "--no-progress", expect=1)
    assert message in err and len(err.strip().splitlines()) == 1
    out, _ = qks(*argv, "--no-progress", "--replace-stale")
    assert "48 images in 3 shard(s)" in out
    np.testing.assert_array_equal(open_index(path).z[:], open_index(clean_index).z[:])


def test_verify_lists_every_damaged_chunk_of_an_index(clean_index, tmp_path):
    verdict = verify_index(clean_index)
    assert verdict.kind == "query index" and verdict.problems == []
    assert "every chunk's crc32c checked" in verdict.summary
    path = _damaged(clean_index, tmp_path, INDEX_CHUNKS["labels"], "flipped")
    (path / INDEX_CHUNKS["z"]).unlink()
    (path / "done" / "00002.json").unlink()
    problems = verify_index(path).problems
    assert problems[0] == "shard 2: no done marker (not built)"
    assert problems[1] == f"{path / INDEX_CHUNKS['z']}: chunk missing"
    assert problems[2].startswith(f"{path / INDEX_CHUNKS['labels']}: chunk unreadable: crc32c")
    assert len(problems) == 3
    # `qks cache verify` tells an index from the stores
    out, _ = qks("cache", "verify", clean_index)
    assert out.startswith(f"{clean_index}: OK (query index: ")
    _, err = qks("cache", "verify", path, expect=1)
    assert err.startswith(f"{path}: damaged query index, 3 problem(s):")


@pytest.mark.parametrize(
    "labels, message",
    [
        (" , ,", "the label list is empty"),
        (",".join(f"label{i}" for i in range(10_000)), "10000 labels, more than index.max_labels"),
    ],
)
def test_bad_label_lists_are_one_line_and_write_nothing(sample, tmp_path, labels, message):
    file = tmp_path / "labels.txt"
    file.write_text(labels.replace(",", "\n"))
    out = tmp_path / "tags.jsonl"
    _, err = qks(
        "tag",
        "--index",
        sample.index,
        "--labels-file",
        file,
        "--out",
        out,
        "--device",
        "cpu",
        expect=1,
    )
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.glob(".*tmp*")) == []


def test_an_incomplete_or_missing_index_is_one_line(synthetic, tmp_path):
    data, checkpoint = synthetic
    path = tmp_path / "i.zarr"
    build_index(checkpoint, data.test, path)
    (path / "done" / "00002.json").unlink()
    _, err = qks("search", "--index", path, "seen0", expect=1)
    assert "index is incomplete: 1 of 3 shards not built" in err
    _, err = qks("tag", "--index", tmp_path / "none.zarr", "--labels", "a", expect=1)
    assert "no query index here" in err
    _, err = qks(
        "evaluate",
        "--index",
        data.test,
        "--labels",
        data.labels,
        "--out",
        tmp_path / "m.json",
        expect=1,
    )
    assert "not a qks query index" in err


def test_evaluate_refuses_an_index_of_a_training_store(synthetic, tmp_path):
    data, checkpoint = synthetic
    build_index(checkpoint, data.train, tmp_path / "train.zarr")
    args = ["evaluate", "--index", tmp_path / "train.zarr", "--labels", data.labels, "--out"]
    _, err = qks(*args, tmp_path / "m.json", expect=1)
    assert "an index of a train store" in err
    qks(*args, tmp_path / "m.json", "--any-split")
    _, err = qks(*args, tmp_path / "m.json", "--checkpoint", checkpoint, expect=2)
    assert "without --checkpoint" in err


@pytest.mark.slow
def test_a_cluster_build_equals_the_in_process_one(synthetic, tmp_path):
    pytest.importorskip("distributed")
    data, checkpoint = synthetic
    build_index(checkpoint, data.test, tmp_path / "here.zarr")
    result = build_index(checkpoint, data.test, tmp_path / "dask.zarr", cluster="local:1")
    assert result.computed == 48
    here, there = open_index(tmp_path / "here.zarr"), open_index(tmp_path / "dask.zarr")
    np.testing.assert_array_equal(here.z[:], there.z[:])
