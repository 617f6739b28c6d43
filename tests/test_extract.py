"""Stage one end to end: `qks extract` and `qks embed-labels`, tiny model; bad images; resuming."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qks_pipeline.data.images import BadImage, load_rgb
from qks_pipeline.data.manifest import Record, label_matrix, read_manifest, write_manifest
from qks_pipeline.stage_one.backbone import encode_labels, load_backbone, visual_tokens
from qks_pipeline.store.features import open_cache
from qks_pipeline.store.label_store import read_label_embeddings
from tests.tiny import embed_args, extract_args, qks

# ---------------------------------------------------------------- image loading


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size and holds no pixels: a decompression bomb PIL refuses."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_modes_convert_to_rgb(tmp_path):
    gray = load_rgb(_save(Image.new("L", (8, 8), 100), tmp_path / "gray.png"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    clear = load_rgb(_save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), tmp_path / "clear.png"))
    assert clear.getpixel((0, 0)) == (255, 255, 255)  # composited on white, not black
    half = load_rgb(
        _save(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), tmp_path / "half.png")
    ).getpixel((0, 0))
    assert half[0] == 255 and 120 <= half[1] <= 135 and half[1] == half[2]
    la = load_rgb(_save(Image.new("LA", (8, 8), (0, 0)), tmp_path / "la.png"))
    assert la.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_rgb(_save(pal, tmp_path / "pal.png")).getpixel((0, 0)) == (10, 200, 30)
    assert load_rgb(_save(pal, tmp_path / "pal_t.png", transparency=1)).getpixel((0, 0)) == (
        255,
        255,
        255,
    )
    cmyk = load_rgb(
        _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    )
    assert np.abs(np.subtract(cmyk.getpixel((8, 8)), (255, 0, 0))).max() <= 8
    deep = np.array([[65535, 32896], [0, 257]], dtype=np.uint16)
    img16 = load_rgb(_save(Image.fromarray(deep), tmp_path / "deep.png"))
    # scaled, not clipped
    assert [img16.getpixel(p)[0] for p in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [255, 128, 0, 1]


def test_unreadable_files_raise_with_a_reason(tmp_path, monkeypatch):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        good, "JPEG"
    )
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image" * 10)
    (tmp_path / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    # over the warning, under the error limit
    (tmp_path / "bomb_warn.png").write_bytes(_png_header_only(10000, 10000))
    cases = {
        "nope.jpg": "missing",
        "empty.jpg": "empty",
        "cut.jpg": "truncated",
        "junk.jpg": "not a readable",
    }
    cases |= {"bomb.png": "decompression bomb", "bomb_warn.png": "decompression bomb"}
    for name, reason in cases.items():
        with pytest.raises(BadImage, match=reason):
            load_rgb(tmp_path / name)


# ---------------------------------------------------------------- extraction


def _extract(
    ds, tiny_clip, out: Path, *extra: object, split: str = "train", expect: int = 0
) -> str:
    return qks(*extract_args(ds, tiny_clip, out, split, shard_size=5), *extra, expect=expect)


def _arrays(store: Path) -> dict[str, np.ndarray]:
    cache = open_cache(store)
    names = ("tokens", "valid", "labels", "paths", "manifest_index", "visual_proj")
    return {name: cache.group[name][:] for name in names}


def test_store_holds_the_tokens_labels_and_order(sample_dataset, tiny_clip, tmp_path):
    ds = sample_dataset
    out = tmp_path / "train.zarr"
    _extract(ds, tiny_clip, out, "--set", "extract.batch_size=3")
    cache = open_cache(out)
    records = read_manifest(ds.dataset / "train.jsonl")
    assert cache.tokens.shape == (16, 1, 17, 64) and cache.tokens.dtype == np.float16
    assert cache.done_shards() == {0, 1, 2, 3} and cache.num_shards == 4 and cache.valid[:].all()
    order = cache.manifest_index[:]
    # shuffled with the seed
    assert sorted(order) == list(range(16)) and list(order) != list(range(16))
    assert list(cache.paths[:]) == [records[i].image for i in order]
    np.testing.assert_array_equal(
        cache.labels[:], label_matrix(records, ds.seen + ds.unseen)[order]
    )
    assert cache.label_names == ds.seen + ds.unseen and cache.num_seen == len(ds.seen)
    backbone = load_backbone(str(tiny_clip[0]), str(tiny_clip[1]))
    model, preprocess = backbone.model, backbone.preprocess
    # (N, 3, H, W)
    images = torch.stack([preprocess(load_rgb(ds.images / p)) for p in cache.paths[:]])
    expected = visual_tokens(model, images).numpy()  # (N, T, D)
    np.testing.assert_allclose(
        cache.tokens[:, 0].astype(np.float32), expected, rtol=2e-3, atol=2e-3
    )
    np.testing.assert_array_equal(cache.visual_proj[:], model.visual.proj.detach().numpy())
    data = cache.fingerprint["data"]
    assert (
        data["split"] == "train"
        and len(data["manifest_sha256"]) == 64
        and data["precision"] == "fp32"
    )


def test_workers_give_the_same_store(sample_dataset, tiny_clip, tmp_path):
    _extract(sample_dataset, tiny_clip, tmp_path / "a.zarr", "--set", "extract.views=1")
    _extract(
        sample_dataset,
        tiny_clip,
        tmp_path / "b.zarr",
        "--set",
        "extract.views=1",
        "--set",
        "extract.workers=2",
    )
    a, b = _arrays(tmp_path / "a.zarr"), _arrays(tmp_path / "b.zarr")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_augmented_views_are_seeded_and_view_zero_is_clean(sample_dataset, tiny_clip, tmp_path):
    _extract(sample_dataset, tiny_clip, tmp_path / "clean.zarr")
    _extract(sample_dataset, tiny_clip, tmp_path / "v1.zarr", "--set", "extract.views=2")
    _extract(
        sample_dataset,
        tiny_clip,
        tmp_path / "v2.zarr",
        "--set",
        "extract.views=2",
        "--set",
        "extract.batch_size=6",
    )
    clean, v1, v2 = (
        open_cache(tmp_path / f"{n}.zarr").tokens[:].astype(np.float32)
        for n in ("clean", "v1", "v2")
    )
    assert v1.shape == (16, 3, 17, 64)
    np.testing.assert_allclose(v1[:, 0], clean[:, 0], atol=2e-3)
    np.testing.assert_allclose(v1, v2, atol=2e-3)  # same crops whatever the batching
    assert np.abs(v1[:, 1] - v1[:, 0]).mean() > 1e-2 and np.abs(v1[:, 2] - v1[:, 1]).mean() > 1e-2


def test_test_split_stores_the_clean_view_only(sample_dataset, tiny_clip, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  views: 2\n  shuffle: false\n  precision: fp16\n")
    _extract(sample_dataset, tiny_clip, tmp_path / "test.zarr", "--params", params, split="test")
    cache = open_cache(tmp_path / "test.zarr")
    assert cache.tokens.shape[:2] == (8, 1) and list(cache.manifest_index[:]) == list(range(8))
    assert cache.fingerprint["data"]["precision"] == "fp32"  # fp16 autocast is GPU-only
    out = _extract(
        sample_dataset,
        tiny_clip,
        tmp_path / "t2.zarr",
        "--set",
        "extract.views=2",
        split="test",
        expect=2,
    )
    assert "train split only" in out


def test_a_store_built_differently_is_refused_then_overwritten(sample_dataset, tiny_clip, tmp_path):
    out = tmp_path / "train.zarr"
    _extract(sample_dataset, tiny_clip, out)
    assert "already complete" in _extract(sample_dataset, tiny_clip, out)
    message = _extract(sample_dataset, tiny_clip, out, "--set", "extract.views=1", expect=1)
    assert "data.views is 0 in the store, 1 expected" in message and "--replace-stale" in message
    _extract(sample_dataset, tiny_clip, out, "--set", "extract.views=1", "--overwrite")
    assert open_cache(out).num_views == 2
    marker = out / "done" / "00000.json"
    inode = marker.stat().st_ino
    assert "already complete" in _extract(
        sample_dataset, tiny_clip, out, "--set", "extract.views=1", "--replace-stale"
    )
    assert marker.stat().st_ino == inode  # a store built the same way is kept
    _extract(sample_dataset, tiny_clip, out, "--set", "extract.views=2", "--replace-stale")
    assert open_cache(out).num_views == 3  # one built differently is rebuilt
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a store")
    message = _extract(sample_dataset, tiny_clip, tmp_path / "mine", "--overwrite", expect=1)
    assert (
        "is not a feature cache; refusing to replace it" in message
        and (tmp_path / "mine" / "notes.txt").exists()
    )


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


@pytest.mark.parametrize("key", ["tokens/c/1/0/0/0", "valid/c/1"])
def test_a_done_shard_that_lost_a_file_is_computed_again(sample_dataset, tiny_clip, tmp_path, key):
    """'Already complete' means the files are there: a rerun redoes a shard whose file is gone."""
    out = tmp_path / "train.zarr"
    _extract(sample_dataset, tiny_clip, out)
    whole = _files(out)
    (out / key).unlink()
    message = _extract(sample_dataset, tiny_clip, out)
    assert "already complete" not in message and "5 images in 1 shard(s)" in message, message
    assert _files(out) == whole
    assert "already complete" in _extract(sample_dataset, tiny_clip, out)


def test_a_lost_chunk_only_a_rebuild_writes_is_refused_naming_it(
    sample_dataset, tiny_clip, tmp_path
):
    out = tmp_path / "train.zarr"
    _extract(sample_dataset, tiny_clip, out)
    (out / "labels/c/2/0").unlink()
    message = _extract(sample_dataset, tiny_clip, out, expect=1)
    assert f"Error: {out / 'labels/c/2/0'}: chunk missing" in message and "--overwrite" in message
    _extract(sample_dataset, tiny_clip, out, "--overwrite")
    assert "OK (feature store" in qks("cache", "verify", out)


def _bad_dataset(ds, tmp_path: Path) -> tuple[Path, Path]:
    """The sample train split plus broken files and odd modes (which must load)."""
    images, dataset = tmp_path / "images", tmp_path / "dataset"
    shutil.copytree(ds.images, images)
    shutil.copytree(ds.dataset, dataset)
    (images / "bad").mkdir()
    (images / "bad/empty.jpg").write_bytes(b"")
    (images / "bad/junk.png").write_bytes(b"\x89PNG not really")
    (images / "bad/cut.png").write_bytes((images / "train/img001.png").read_bytes()[:200])
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(images / "bad/cmyk.jpg")
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(images / "bad/rgba.png")
    extra = [
        "bad/missing.jpg",
        "bad/empty.jpg",
        "bad/junk.png",
        "bad/cut.png",
        "bad/cmyk.jpg",
        "bad/rgba.png",
    ]
    with open(dataset / "train.jsonl", "a") as f:
        f.writelines(json.dumps({"image": p, "positive": ["red"]}) + "\n" for p in extra)
    return dataset, images


def test_bad_images_are_masked_recorded_and_summarised(sample_dataset, tiny_clip, tmp_path):
    dataset, images = _bad_dataset(sample_dataset, tmp_path)
    ds = type(sample_dataset)(
        dataset, images, sample_dataset.templates, sample_dataset.seen, sample_dataset.unseen
    )
    out = _extract(ds, tiny_clip, tmp_path / "train.zarr")
    assert "4 unreadable image(s) masked out" in out and "bad/empty.jpg: empty file" in out
    cache = open_cache(tmp_path / "train.zarr")
    reasons = {s["path"]: s["reason"] for s in cache.skipped()}
    assert set(reasons) == {"bad/missing.jpg", "bad/empty.jpg", "bad/junk.png", "bad/cut.png"}
    assert reasons["bad/missing.jpg"] == "missing" and reasons["bad/cut.png"].startswith(
        "truncated"
    )
    paths, valid, tokens = cache.paths[:], cache.valid[:], cache.tokens[:]
    assert set(paths[~valid]) == set(reasons)
    assert not tokens[~valid].any()  # masked rows stay zero ...
    # ... and no valid row is all zero
    assert (np.abs(tokens[valid]).reshape(valid.sum(), -1).max(1) > 0).all()
    assert "OK" in qks("cache", "verify", tmp_path / "train.zarr")
    strict = _extract(ds, tiny_clip, tmp_path / "strict.zarr", "--strict", expect=1)
    error = strict.strip().splitlines()[-1]  # the progress bar may precede it
    assert error.startswith("Error: ") and "/images/bad/" in error and "unreadable image" in error


RESUME_SCRIPT = """
import sys, time
from qks_pipeline.store import features as cache
write = cache.Cache.write_shard
# widen the gap between shards so the test can kill in between
def slow_write(self, *args, **kwargs):
    write(self, *args, **kwargs)
    time.sleep(1.0)
cache.Cache.write_shard = slow_write
from qks_pipeline.cli import main
main()
"""


def test_a_killed_extraction_resumes_and_equals_an_uninterrupted_one(
    sample_dataset, tiny_clip, tmp_path
):
    out = tmp_path / "killed.zarr"
    args = extract_args(sample_dataset, tiny_clip, out, shard_size=4, views=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while (
        not list((out / "done").glob("*.json"))
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    done = sorted((out / "done").glob("*.json"))
    assert 1 <= len(done) < 4, "the kill must land between the first shard and the last"
    inodes = {p.name: p.stat().st_ino for p in done}
    qks(*args)  # resume
    assert {
        p.name: p.stat().st_ino for p in (out / "done").glob("*.json") if p.name in inodes
    } == inodes
    assert len(open_cache(out).done_shards()) == 4
    # uninterrupted
    qks(*extract_args(sample_dataset, tiny_clip, tmp_path / "whole.zarr", shard_size=4, views=1))
    a, b = _arrays(out), _arrays(tmp_path / "whole.zarr")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_embed_labels_stores_seen_then_unseen(sample_dataset, tiny_clip, tmp_path):
    out = tmp_path / "labels.zarr"
    qks(*embed_args(sample_dataset, tiny_clip, out))
    names, emb, attrs = read_label_embeddings(out)
    assert names == sample_dataset.seen + sample_dataset.unseen and emb.shape == (7, 32)
    assert (
        attrs["num_seen"] == 5
        and attrs["normalize"] is False
        and len(attrs["templates_sha256"]) == 64
    )
    backbone = load_backbone(str(tiny_clip.config), str(tiny_clip.weights))
    model, tokenizer = backbone.model, backbone.tokenizer
    # the files a checkpoint trained on these labels can find
    assert attrs["backbone_source"] == backbone.source
    templates = sample_dataset.templates.read_text().splitlines()
    np.testing.assert_allclose(
        emb, encode_labels(model, tokenizer, names, templates).numpy(), rtol=1e-5, atol=1e-6
    )
    _extract(sample_dataset, tiny_clip, tmp_path / "train.zarr")
    assert (
        attrs["fingerprint"]["backbone"]
        == open_cache(tmp_path / "train.zarr").fingerprint["backbone"]
    )


def test_compact_negatives_cover_the_split_labels_only(sample_dataset, tiny_clip, tmp_path):
    """`"negative": "*"` makes every other seen label negative; unseen labels stay unknown."""
    ds = sample_dataset
    dataset = tmp_path / "dataset"
    shutil.copytree(ds.dataset, dataset)
    records = [
        Record(r.image, tuple(x for x in r.positive if x in ds.seen), negative_rest=True)
        for r in read_manifest(dataset / "train.jsonl")
    ]
    write_manifest(dataset / "train.jsonl", records)
    out = tmp_path / "train.zarr"
    _extract(dataclasses.replace(ds, dataset=dataset), tiny_clip, out)
    labels = open_cache(out).labels[:]  # (N, C) over seen + unseen
    seen = len(ds.seen)
    assert set(np.unique(labels[:, :seen])) == {-1, 1} and (labels[:, seen:] == 0).all()


def test_max_pixels_masks_larger_images_with_their_numbers(
    sample_dataset, tiny_clip, tmp_path, monkeypatch
):
    # restored: the limit is process-wide
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    paths = [r.image for r in read_manifest(sample_dataset.dataset / "train.jsonl")]
    sizes = {p: Image.open(sample_dataset.images / p).size for p in paths}
    # about half the images are larger
    limit = sorted(w * h for w, h in sizes.values())[len(sizes) // 2]
    _extract(
        sample_dataset, tiny_clip, tmp_path / "train.zarr", "--set", f"extract.max_pixels={limit}"
    )
    reasons = {s["path"]: s["reason"] for s in open_cache(tmp_path / "train.zarr").skipped()}
    larger = {p: w * h for p, (w, h) in sizes.items() if w * h > limit}
    assert reasons == {
        p: (
            f"decompression bomb: {n:,} pixels, above the limit of {limit:,} "
            "(raise it with --set extract.max_pixels=N)"
        )
        for p, n in larger.items()
    }
