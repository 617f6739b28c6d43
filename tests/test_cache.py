"""The Zarr store: creation, shard writes, done markers, fingerprints, verify, label embeddings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from qks_pipeline.cli import main
from qks_pipeline.errors import QKSError
from qks_pipeline.store.checked import has_checksums
from qks_pipeline.store.features import ARRAYS, cache_summary, create_cache, open_cache
from qks_pipeline.store.fingerprint import check_fingerprint, make_fingerprint
from qks_pipeline.store.label_store import (
    CLIP_EMBEDDINGS,
    read_label_embeddings,
    write_label_embeddings,
)
from qks_pipeline.store.verify import verify_cache, verify_label_store

N, V, T, D, C = 10, 2, 5, 8, 3


def _store(path, shard_size: int = 4):
    rng = np.random.default_rng(0)
    kw = {
        "labels": rng.integers(-1, 2, (N, C)).astype(np.int8),
        "paths": [f"img{i}.jpg" for i in range(N)],
    }
    kw |= {
        "manifest_index": np.arange(N)[::-1].copy(),
        "visual_proj": rng.standard_normal((D, 4)).astype(np.float32),
    }
    kw |= {"label_names": ["a", "b", "c"], "num_seen": 2}
    fingerprint = make_fingerprint({"model": "m", "shape": (T, D)}, {"split": "train"})
    cache = create_cache(
        path, fingerprint=fingerprint, token_shape=(T, D), num_views=V, shard_size=shard_size, **kw
    )
    return cache, rng.standard_normal((N, V, T, D)).astype(np.float16)


def _fill(cache, tokens, bad_rows=()):
    for shard in range(cache.num_shards):
        rows = cache.shard_rows(shard)
        valid = np.ones(rows.stop - rows.start, bool)
        part = tokens[rows].copy()
        skipped = []
        for r in bad_rows:
            if rows.start <= r < rows.stop:
                valid[r - rows.start] = False
                part[r - rows.start] = 0
                skipped.append({"path": f"img{r}.jpg", "reason": "missing"})
        cache.write_shard(shard, part, valid, skipped)


def test_whole_shard_writes_and_done_markers(tmp_path):
    cache, tokens = _store(tmp_path / "s.zarr")
    assert (
        cache.num_shards == 3
        and cache.shard_rows(2) == slice(8, 10)
        and cache.done_shards() == set()
    )
    with pytest.raises(QKSError, match="3 of 3 shards not extracted"):
        cache.require_complete()
    _fill(cache, tokens, bad_rows=[5])
    again = open_cache(tmp_path / "s.zarr")
    assert len(again.done_shards()) == again.num_shards and again.done_record(1) == {
        "shard": 1,
        "rows": [4, 8],
        "skipped": [{"path": "img5.jpg", "reason": "missing"}],
    }
    expected = tokens.copy()
    expected[5] = 0
    np.testing.assert_array_equal(again.tokens[:], expected)
    assert list(again.valid[:]) == [i != 5 for i in range(N)]
    assert (
        list(again.paths[:]) == [f"img{i}.jpg" for i in range(N)]
        and again.manifest_index[0] == N - 1
    )
    assert again.skipped() == [{"path": "img5.jpg", "reason": "missing"}]
    assert (
        again.label_names == ["a", "b", "c"]
        and again.num_seen == 2
        and again.visual_proj.shape == (D, 4)
    )


def test_an_all_zero_shard_is_written_whole(tmp_path):
    """From format version 3 a chunk equal to the fill value is written too: an absent chunk can
    only be damage."""
    cache, _ = _store(tmp_path / "s.zarr")
    cache.write_shard(0, np.zeros((4, V, T, D), np.float16), np.zeros(4, bool), [])
    assert cache.done_shards() == {0} and not cache.tokens[0:4].any()
    assert (cache.path / "tokens/c/0/0/0/0").is_file() and (cache.path / "valid/c/0").is_file()
    assert cache.missing_chunks() == []
    again, _ = _store(tmp_path / "zeros.zarr")
    again.labels[:] = 0
    assert again.missing_chunks() == [] and (again.path / "labels/c/1/0").is_file()


def test_every_chunk_of_every_array_has_a_crc32c(tmp_path):
    cache, tokens = _store(tmp_path / "s.zarr")
    _fill(cache, tokens)
    write_label_embeddings(
        tmp_path / "l.zarr", ["a"], np.ones((1, 4), np.float32), {}, np.ones((1, 4), np.float32)
    )
    labels = zarr.open_group(tmp_path / "l.zarr", mode="r")
    arrays = [cache.group[name] for name in ARRAYS] + [
        labels["embeddings"],
        labels[CLIP_EMBEDDINGS],
    ]
    assert all(has_checksums(a) for a in arrays)
    assert cache.fingerprint["format_version"] == 3


# a chunk of each array, with a row of it
CHUNKS = {
    "tokens": ("tokens/c/1/0/0/0", 5),
    "labels": ("labels/c/1/0", 5),
    "valid": ("valid/c/2", 9),
    "paths": ("paths/c/0", 0),
    "manifest_index": ("manifest_index/c/0", 0),
    "visual_proj": ("visual_proj/c/0/0", 0),
}


@pytest.mark.parametrize("name", list(CHUNKS))
def test_a_missing_chunk_of_any_array_is_damage_never_a_fill_value(tmp_path, name):
    cache, tokens = _store(tmp_path / "s.zarr")
    _fill(cache, tokens)
    key = CHUNKS[name][0]
    (cache.path / key).unlink()
    again = open_cache(cache.path)
    with pytest.raises(QKSError, match="chunk missing") as e:
        again.require_complete()
    assert str(e.value).startswith(f"{cache.path / key}: chunk missing") and "\n" not in str(
        e.value
    )
    assert verify_cache(again) == [f"{cache.path / key}: chunk missing"]
    result = CliRunner().invoke(main, ["cache", "verify", str(cache.path)])
    assert result.exit_code == 1 and "damaged feature store, 1 problem(s)" in result.output


def _flip(path, at: int = -5) -> None:
    """Flip one bit of a file (by default in the bytes just before a chunk's crc32c)."""
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", [n for n in CHUNKS if n != "tokens"])
def test_a_flipped_bit_in_any_array_is_one_error_naming_the_chunk(tmp_path, name):
    cache, tokens = _store(tmp_path / "s.zarr")
    _fill(cache, tokens)
    key, row = CHUNKS[name]
    _flip(cache.path / key)
    again = open_cache(cache.path)
    again.require_complete()
    with pytest.raises(QKSError) as e:
        getattr(again, name)[row]
    assert str(e.value) == (
        f"{cache.path / key}: chunk unreadable: crc32c checksum mismatch (corrupt or truncated "
        "file); the store is damaged; rebuild it"
    )
    assert verify_cache(again) == [str(e.value)]


def test_a_store_before_version_3_is_read_with_the_checks_its_layout_allows(tmp_path):
    """Version 2 wrote no chunk equal to the fill value: a shard of unreadable images only may lack
    its files; another shard's missing file, or a labels chunk, is damage."""
    cache, tokens = _store(tmp_path / "s.zarr")
    _fill(cache, tokens, bad_rows=[8, 9])
    cache.group.attrs["fingerprint"] = {**cache.fingerprint, "format_version": 2}
    for key in ("tokens/c/2/0/0/0", "valid/c/2"):
        (cache.path / key).unlink()
    open_cache(cache.path).require_complete()
    assert verify_cache(open_cache(cache.path)) == []
    for key in ("tokens/c/1/0/0/0", "labels/c/0/0"):
        damaged = shutil.copytree(cache.path, tmp_path / key.replace("/", "_"))
        (damaged / key).unlink()
        with pytest.raises(QKSError, match=f"{damaged / key}: chunk missing"):
            open_cache(damaged).require_complete()


def test_verify_checks_a_label_store_and_says_so(tmp_path):
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    store = tmp_path / "l.zarr"
    write_label_embeddings(store, ["a", "b", "c"], emb, make_fingerprint({}), emb)
    result = CliRunner().invoke(main, ["cache", "verify", str(store)])
    assert result.exit_code == 0 and result.output.startswith(f"{store}: OK (label store: 3 labels")
    _flip(store / "embeddings/c/0/0")
    result = CliRunner().invoke(main, ["cache", "verify", str(store)])
    assert result.exit_code == 1 and "damaged label store, 1 problem(s)" in result.output
    assert f"{store / 'embeddings/c/0/0'}: chunk unreadable: crc32c" in result.output
    with pytest.raises(QKSError, match="embeddings/c/0/0: chunk unreadable: crc32c"):
        read_label_embeddings(store)
    (store / "embeddings/c/0/0").unlink()
    with pytest.raises(QKSError, match="embeddings/c/0/0: chunk missing"):
        read_label_embeddings(store)
    assert verify_label_store(store).problems == [f"{store / 'embeddings/c/0/0'}: chunk missing"]


def test_fingerprints_compare_after_a_round_trip_and_name_differences(tmp_path):
    cache, _ = _store(tmp_path / "s.zarr")
    expected = make_fingerprint({"model": "m", "shape": (T, D)}, {"split": "train"})
    # tuples became lists on both sides
    check_fingerprint(cache.path, open_cache(cache.path).fingerprint, expected)
    other = make_fingerprint({"model": "m2", "shape": (T, D)}, {"split": "test"})
    with pytest.raises(
        QKSError,
        match=r"backbone.model is 'm' in the store, 'm2' expected; data.split .* \(rebuild\)",
    ):
        check_fingerprint(cache.path, cache.fingerprint, other, hint="rebuild")


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(QKSError, match="no feature cache here"):
        open_cache(tmp_path)
    zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    with pytest.raises(QKSError, match="not a qks feature cache"):
        open_cache(tmp_path / "g.zarr")
    cache, _ = _store(tmp_path / "s.zarr")
    cache.group.attrs["fingerprint"] = {**cache.fingerprint, "format_version": 99}
    with pytest.raises(QKSError, match="format version 99"):
        open_cache(tmp_path / "s.zarr")


def test_verify_finds_missing_markers_mismatches_and_damage(tmp_path):
    cache, tokens = _store(tmp_path / "s.zarr")
    _fill(cache, tokens, bad_rows=[1])
    assert verify_cache(cache) == []
    (cache.path / "done" / "00002.json").unlink()
    marker = cache.path / "done" / "00000.json"
    # row 1 invalid, none recorded
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "skipped": []}))
    # valid rows of zeros
    cache.write_shard(1, np.zeros((4, V, T, D), np.float16), np.ones(4, bool), [])
    problems = verify_cache(cache)
    assert problems[0] == "shard 2: no done marker (not extracted)"
    assert "shard 0: 1 rows not valid but 0 images recorded as skipped" in problems
    assert any("row 4 (img4.jpg) is valid but all zero" in p for p in problems)
    result = CliRunner().invoke(main, ["cache", "verify", str(cache.path)])
    assert result.exit_code == 1 and "problem(s)" in result.output


@pytest.mark.parametrize("kind", ["index", "truncated", "bit"])
def test_verify_checks_every_chunk_and_names_shard_and_row(tmp_path, kind):
    """A corrupt index, a truncated shard, one flipped bit: `cache verify` fails, naming each."""
    cache, tokens = _store(tmp_path / "s.zarr")
    _fill(cache, tokens)
    path = cache.path / "tokens" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(path.read_bytes())
    # shards of 4 rows x V views, (offset, nbytes) each, then the index's crc32c
    index_bytes = 4 * V * 16 + 4
    if kind == "index":
        raw[-index_bytes + 5] ^= 0x04
    elif kind == "truncated":
        del raw[-index_bytes // 2 :]
    else:  # the lowest mantissa bit of one float16 of row 6, view 1
        offset = np.frombuffer(bytes(raw[-index_bytes:-4]), "<u8").reshape(4, V, 2)[6 - 4, 1, 0]
        raw[int(offset) + 2 * 7] ^= 0x01
    path.write_bytes(bytes(raw))
    problems = verify_cache(open_cache(cache.path))
    assert (
        len(problems) == 1
        and problems[0].startswith(f"shard 1: {path}: row ")
        and "\n" not in problems[0]
    )
    if kind == "bit":
        assert problems[0].endswith("row 6 view 1: chunk checksum mismatch (corrupt shard file)")
    result = CliRunner().invoke(main, ["cache", "verify", str(cache.path)])
    assert result.exit_code == 1 and f"shard 1: {path}: row " in result.output


def test_a_store_of_format_version_1_still_opens(tmp_path):
    cache, tokens = _store(tmp_path / "s.zarr")
    cache.group.attrs["fingerprint"] = {**cache.fingerprint, "format_version": 1}
    assert open_cache(cache.path).fingerprint["format_version"] == 1


def test_info_summarises(tmp_path):
    cache, tokens = _store(tmp_path / "s.zarr")
    _fill(cache, tokens, bad_rows=[3])
    info = cache_summary(cache)
    assert (
        info["images"] == N
        and info["views"] == V
        and info["shards"].startswith("3/3 done")
        and info["skipped"] == 1
    )
    result = CliRunner().invoke(main, ["cache", "info", str(cache.path)])
    assert result.exit_code == 0 and "float16 (10, 2, 5, 8)" in result.output


def test_label_embeddings_round_trip(tmp_path):
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    write_label_embeddings(
        tmp_path / "l.zarr", ["a", "b", "c"], emb, make_fingerprint({"model": "m"}), num_seen=2
    )
    names, got, attrs = read_label_embeddings(tmp_path / "l.zarr")
    assert (
        names == ["a", "b", "c"]
        and attrs["num_seen"] == 2
        and attrs["fingerprint"]["backbone"] == {"model": "m"}
    )
    np.testing.assert_array_equal(got, emb)
