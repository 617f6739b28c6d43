"""HDF5 export and import: a round trip gives back the same store."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from qks_pipeline.cli import main
from qks_pipeline.errors import QKSError
from qks_pipeline.store.features import create_cache, open_cache
from qks_pipeline.store.fingerprint import make_fingerprint
from qks_pipeline.store.hdf5 import export_hdf5_cache, import_hdf5_cache
from qks_pipeline.store.verify import verify_cache

N, V, T, D = 9, 2, 5, 8


def _complete_store(path):
    rng = np.random.default_rng(0)
    cache = create_cache(
        path,
        fingerprint=make_fingerprint({"model": "m"}, {"split": "train", "views": 1}),
        token_shape=(T, D),
        num_views=V,
        shard_size=4,
        label_names=["ä", "b c", "d"],
        num_seen=2,
        labels=rng.integers(-1, 2, (N, 3)).astype(np.int8),
        paths=[f"dir/ïmg{i}.jpg" for i in range(N)],
        manifest_index=rng.permutation(N),
        visual_proj=rng.standard_normal((D, 4)).astype(np.float32),
    )
    tokens = rng.standard_normal((N, V, T, D)).astype(np.float16)
    for shard in range(cache.num_shards):
        rows = cache.shard_rows(shard)
        valid = np.ones(rows.stop - rows.start, bool)
        skipped = []
        if shard == 1:
            valid[0], tokens[rows.start] = False, 0
            skipped = [{"path": f"dir/ïmg{rows.start}.jpg", "reason": "truncated"}]
        cache.write_shard(shard, tokens[rows], valid, skipped)
    return cache


def test_round_trip_equals_the_original(tmp_path):
    original = _complete_store(tmp_path / "a.zarr")
    runner = CliRunner()
    assert (
        runner.invoke(
            main, ["cache", "export-hdf5", str(original.path), str(tmp_path / "a.h5")]
        ).exit_code
        == 0
    )
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["features"].shape == (N, V, T, D) and f["features"].dtype == np.float16
        np.testing.assert_array_equal(f["features"][:], original.tokens[:])
    result = runner.invoke(
        main, ["cache", "import-hdf5", str(tmp_path / "a.h5"), str(tmp_path / "b.zarr")]
    )
    assert result.exit_code == 0, result.output
    copy = open_cache(tmp_path / "b.zarr")
    for name in ("tokens", "valid", "labels", "paths", "manifest_index", "visual_proj"):
        np.testing.assert_array_equal(copy.group[name][:], original.group[name][:], err_msg=name)
    assert copy.fingerprint == original.fingerprint and copy.label_names == original.label_names
    assert copy.num_seen == 2 and copy.shard_size == 4
    assert [copy.done_record(s) for s in range(3)] == [original.done_record(s) for s in range(3)]
    assert verify_cache(copy) == []


def test_import_refuses_foreign_files_and_existing_stores(tmp_path):
    _complete_store(tmp_path / "a.zarr")
    export_hdf5_cache(tmp_path / "a.zarr", tmp_path / "a.h5")
    with pytest.raises(QKSError, match="store exists"):
        import_hdf5_cache(tmp_path / "a.h5", tmp_path / "a.zarr")
    import_hdf5_cache(tmp_path / "a.h5", tmp_path / "a.zarr", overwrite=True)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(QKSError, match="not a qks feature-cache export"):
        import_hdf5_cache(tmp_path / "other.h5", tmp_path / "c.zarr")


def test_export_refuses_an_incomplete_store(tmp_path):
    cache = _complete_store(tmp_path / "a.zarr")
    (cache.path / "done" / "00001.json").unlink()
    with pytest.raises(QKSError, match="incomplete"):
        export_hdf5_cache(cache.path, tmp_path / "a.h5")
    assert not list(tmp_path.glob("*.h5*"))  # no half-written file left behind
