"""Extraction on a dask cluster: the single-process store, resumable, one backbone load a worker."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from qks_pipeline.config import BackboneConfig, ExtractConfig
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_one.backbone import load_backbone
from qks_pipeline.stage_one.cluster import OnCluster, ShardJob, _backbone, run_shard
from qks_pipeline.stage_one.extract import extract
from qks_pipeline.store.features import open_cache
from tests.tiny import extract_args, qks

distributed = pytest.importorskip("distributed")

SHARD_SIZE = 5  # 16 train images: shards of 5, 5, 5, 1
VIEWS = 1


@pytest.fixture(scope="module")
def client():
    """A two-worker local cluster (processes, one thread each) shared by this module's tests."""
    local = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, **local) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def _extract_cli(ds, tiny_clip, out: Path, *extra: object, expect: int = 0) -> str:
    settings = dict(shard_size=SHARD_SIZE, views=VIEWS, batch_size=4)
    return qks(*extract_args(ds, tiny_clip, out, **settings), *extra, expect=expect)


def _files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()
    }


def _backbone_calls(client) -> tuple[int, int]:
    """(loads, uses) of the backbone on the workers: its per-process memo's misses, all calls."""
    infos = client.run(_backbone.cache_info).values()
    return sum(i.misses for i in infos), sum(i.hits + i.misses for i in infos)


def test_two_workers_write_the_single_process_store_byte_for_byte(
    sample_dataset, tiny_clip, tmp_path, client
):
    _extract_cli(sample_dataset, tiny_clip, tmp_path / "single.zarr")
    # the module's two-worker cluster, joined as a running scheduler
    address = client.scheduler.address
    loads, uses = _backbone_calls(client)
    out = _extract_cli(
        sample_dataset,
        tiny_clip,
        tmp_path / "dist.zarr",
        "--cluster",
        address,
        "--set",
        "extract.workers=2",
    )
    assert "16 images in 4 shard(s)" in out
    single, dist = _files(tmp_path / "single.zarr"), _files(tmp_path / "dist.zarr")
    assert sorted(single) == sorted(dist) and len([k for k in single if k.startswith("done/")]) == 4
    for name in single:
        assert single[name] == dist[name], name  # shard files, metadata and done markers alike
    assert open_cache(tmp_path / "dist.zarr").valid[:].all()
    loads_now, uses_now = _backbone_calls(client)
    # 4 tasks; each worker loads the backbone once in its life
    assert uses_now - uses == 4 and loads_now <= 2


def test_a_local_cluster_option_starts_and_stops_its_own_cluster(
    sample_dataset, tiny_clip, tmp_path
):
    out = _extract_cli(sample_dataset, tiny_clip, tmp_path / "local.zarr", "--cluster", "local:2")
    assert "16 images in 4 shard(s)" in out and open_cache(
        tmp_path / "local.zarr"
    ).done_shards() == {0, 1, 2, 3}
    assert "must be local:N" in _extract_cli(
        sample_dataset, tiny_clip, tmp_path / "x.zarr", "--cluster", "two", expect=1
    )
    params = tmp_path / "params.yaml"  # the same through params.yaml (a DVC run: extract.cluster)
    params.write_text("extract:\n  cluster: two\n")
    assert "must be local:N" in _extract_cli(
        sample_dataset, tiny_clip, tmp_path / "y.zarr", "--params", params, expect=1
    )


def test_a_resumed_distributed_run_recomputes_only_the_missing_shard(
    sample_dataset, tiny_clip, tmp_path, client
):
    store = tmp_path / "train.zarr"
    backbone = BackboneConfig(model=str(tiny_clip[0]), pretrained=str(tiny_clip[1]))
    cfg = ExtractConfig(batch_size=4, workers=0, shard_size=SHARD_SIZE, views=VIEWS)
    run = dict(
        dataset_dir=sample_dataset.dataset,
        split="train",
        images_root=sample_dataset.images,
        out=store,
        backbone=backbone,
        cfg=cfg,
        runner=OnCluster(client, "cpu"),
    )
    first = extract(**run)
    assert first.shards_written == 4 and first.computed == 16
    before = _files(store)
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    (store / "done" / "00002.json").unlink()
    second = extract(**run)
    assert second.shards_written == 1 and second.computed == SHARD_SIZE
    rewritten = {
        p for p in store.rglob("*") if p.is_file() and stamps.get(p) != p.stat().st_mtime_ns
    }
    assert {p.relative_to(store).as_posix() for p in rewritten} == {
        "done/00002.json",
        "tokens/c/2/0/0/0",
        "valid/c/2",
    }
    assert _files(store) == before
    assert json.loads((store / "done" / "00002.json").read_text())["rows"] == [10, 15]
    assert extract(**run).shards_written == 0


def test_a_user_error_on_a_worker_is_reported_after_the_other_shards(
    sample_dataset, tiny_clip, tmp_path, client
):
    dataset = tmp_path / "dataset"
    shutil.copytree(sample_dataset.dataset, dataset)
    with open(dataset / "train.jsonl", "a") as f:
        f.write(json.dumps({"image": "train/missing.jpg", "positive": ["red"]}) + "\n")
    backbone = BackboneConfig(model=str(tiny_clip[0]), pretrained=str(tiny_clip[1]))
    cfg = ExtractConfig(batch_size=4, workers=0, shard_size=SHARD_SIZE, shuffle=False)
    run = dict(
        dataset_dir=dataset,
        split="train",
        images_root=sample_dataset.images,
        out=tmp_path / "strict.zarr",
        backbone=backbone,
        cfg=cfg,
    )
    with pytest.raises(
        QKSError, match=r"1 of 4 shard\(s\) failed.*shard 3: .*missing\.jpg: unreadable image"
    ):
        extract(**run, strict=True, runner=OnCluster(client, "cpu", retries=3))
    cache = open_cache(tmp_path / "strict.zarr")
    # the missing image is row 16, in the last shard; the others finished
    assert cache.done_shards() == {0, 1, 2}
    source = load_backbone(backbone.model, backbone.pretrained).source
    job = ShardJob(
        str(cache.path),
        str(sample_dataset.images),
        source["model"],
        source["pretrained"],
        "cpu",
        cfg,
        True,
    )
    outcome = run_shard(3, job)
    # returned, not raised: dask has nothing to retry
    assert outcome.rows == 0 and "(--strict)" in outcome.error
    # no --strict: masked out, only the unfinished shard runs
    result = extract(**run, runner=OnCluster(client, "cpu"))
    assert result.shards_written == 1 and [s["path"] for s in result.skipped] == [
        "train/missing.jpg"
    ]


def test_workers_with_a_gpu_resource_run_one_shard_at_a_time(sample_dataset, tiny_clip, tmp_path):
    """Workers started with `--resources GPU=1`: each task asks for the GPU, so a 2-thread worker
    runs one at a time."""
    backbone = BackboneConfig(model=str(tiny_clip[0]), pretrained=str(tiny_clip[1]))
    cfg = ExtractConfig(batch_size=2, workers=0, shard_size=2)  # 8 small tasks
    local = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "resources": {"GPU": 1}}
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=2, **local) as cluster,
        distributed.Client(cluster) as c,
    ):
        running = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                running.extend(c.run(lambda dask_worker: len(dask_worker.state.executing)).values())

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            ds = sample_dataset
            out = tmp_path / "gpu.zarr"
            result = extract(
                ds.dataset,
                "train",
                ds.images,
                out,
                backbone=backbone,
                cfg=cfg,
                runner=OnCluster(c, "cpu"),
            )
        finally:
            stop.set()
            watcher.join()
    assert result.shards_written == 8 and max(running) == 1
