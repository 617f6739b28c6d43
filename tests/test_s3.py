"""Stores on object storage: extract into S3 (a local moto server), inspect, resume and train from
there.

The server binds 127.0.0.1 on a free port; s3fs finds it through AWS_ENDPOINT_URL (botocore's own
variable).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from zarr.core.sync import sync as zarr_sync

from qks_pipeline.store.features import open_cache
from tests.tiny import embed_args, extract_args, qks, train_args

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "qks"
PARAMS = {
    "model": {"num_queries": 4, "num_layers": 2, "num_heads": 4, "ff_dim": 64},
    "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "val_fraction": 0.25},
}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket, s3fs pointed at it; yields the filesystem."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # instances remember the endpoint they were made with
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
        _close_sessions()
    server.stop()


def _close_sessions() -> None:
    """Close the HTTP sessions of the s3fs instances this module made, then forget them. Left to the
    garbage collector, zarr's (asynchronous, on zarr's event loop) is reported unclosed at exit."""
    for fs in list(s3fs.S3FileSystem._cache.values()):
        if getattr(fs, "_s3creator", None) is None:
            continue
        if fs.asynchronous:
            zarr_sync(fs._s3creator.__aexit__(None, None, None))
        else:
            s3fs.S3FileSystem.close_session(fs.loop, fs._s3creator)
    s3fs.S3FileSystem.clear_instance_cache()


def _extract(ds, tiny_clip, out: str | Path, expect: int = 0) -> str:
    return qks(*extract_args(ds, tiny_clip, out, shard_size=5, views=1), expect=expect)


def _objects(s3, prefix: str) -> dict[str, bytes]:
    return {key[len(prefix) + 1 :]: s3.cat_file(key) for key in s3.find(prefix)}


def _local_files(store: Path) -> dict[str, bytes]:
    return {
        p.relative_to(store).as_posix(): p.read_bytes() for p in store.rglob("*") if p.is_file()
    }


def _train(
    tmp_path: Path, train: str | Path, labels: str | Path, out: str
) -> dict[str, torch.Tensor]:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    qks(*train_args(train, labels, tmp_path / out, params))
    return load_file(tmp_path / out / "best.safetensors")


def test_extract_inspect_resume_and_train_on_s3(s3, sample_dataset, tiny_clip, tmp_path, caplog):
    url, labels_url = f"s3://{BUCKET}/train.zarr", f"s3://{BUCKET}/labels.zarr"
    assert "16 images in 4 shard(s)" in _extract(sample_dataset, tiny_clip, url)
    _extract(sample_dataset, tiny_clip, tmp_path / "local.zarr")
    remote, local = _objects(s3, f"{BUCKET}/train.zarr"), _local_files(tmp_path / "local.zarr")
    assert remote == local  # every shard, metadata file and done marker, byte for byte
    assert not s3.exists(f"{BUCKET}/train.zarr.creating")

    info = qks("cache", "info", url)
    assert f"path: {url}" in info and "shards: 4/4 done" in info and "images: 16" in info
    assert "OK (feature store: 4 shards, 16 images, 0 skipped" in qks("cache", "verify", url)

    s3.rm(f"{BUCKET}/train.zarr/done/00001.json")
    # the server logs every request it serves
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        assert "5 images in 1 shard(s)" in _extract(sample_dataset, tiny_clip, url)
    puts = {
        m[1] for m in re.finditer(r'"PUT /qks/train\.zarr/(\S+) HTTP', "\n".join(caplog.messages))
    }
    assert puts == {"tokens/c/1/0/0/0", "valid/c/1", "done/00001.json"}  # the missing shard only
    cache = open_cache(url)
    assert (
        len(cache.done_shards()) == cache.num_shards
        and _objects(s3, f"{BUCKET}/train.zarr") == local
    )

    h5 = tmp_path / "train.h5"  # HDF5 interop: export from S3, import back to another URL
    qks("cache", "export-hdf5", url, h5)
    qks("cache", "import-hdf5", h5, f"s3://{BUCKET}/again.zarr")
    assert _objects(s3, f"{BUCKET}/again.zarr") == local

    qks(*embed_args(sample_dataset, tiny_clip, labels_url))
    from_s3 = _train(tmp_path, url, labels_url, "run_s3")
    from_disk = _train(tmp_path, tmp_path / "local.zarr", labels_url, "run_local")
    assert from_s3.keys() == from_disk.keys()
    # the zarr reader on S3 feeds training exactly what TensorStore reads from disk
    for key in from_s3:
        assert torch.equal(from_s3[key], from_disk[key]), key


def test_missing_stores_buckets_and_filesystems_are_one_clear_error(s3, sample_dataset, tiny_clip):
    out = qks("cache", "info", f"s3://{BUCKET}/nothing.zarr", expect=1)
    assert f"Error: s3://{BUCKET}/nothing.zarr: no feature cache here" in out
    out = _extract(sample_dataset, tiny_clip, "s3://no-such-bucket/train.zarr", expect=1)
    assert (
        "cannot open a store here (FileNotFoundError: The specified bucket does not exist)" in out
    )
    out = qks("cache", "info", "nosuchfs://bucket/train.zarr", expect=1)
    assert (
        "Error: nosuchfs://bucket/train.zarr: cannot open this URL: Protocol not known: nosuchfs"
        in out
    )
