"""Damaged stores: one chunk of one array missing, or one bit of it flipped, in a copy of a clean
feature store or label store, then each command that reads that array. Every command must refuse in
one line naming the damaged file; a command that exits 0 on a damaged input gave a silent wrong
result. A rerun of `qks extract` on a store that lost a token shard file or a `valid` chunk must
compute it again and equal the clean store."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tests.reliability.faults.outcome import Outcome
from tests.reliability.faults.training import TRAIN_PARAMS
from tests.reliability.harness import (
    ImageData,
    cli,
    compare_trees,
    error_problems,
    extract_argv,
    last_line,
)
from tests.tiny import TinyClip, embed_args, train_args

SHARD_SIZE = 4
# a chunk of each array of a feature store (the token shard, the small arrays' chunks)
FEATURE_CHUNKS = {
    "tokens": "tokens/c/1/0/0/0",
    "labels": "labels/c/1/0",
    "valid": "valid/c/1",
    "paths": "paths/c/0",
    "manifest_index": "manifest_index/c/0",
    "visual_proj": "visual_proj/c/0/0",
}
LABEL_CHUNKS = {"embeddings": "embeddings/c/0/0", "clip_embeddings": "clip_embeddings/c/0/0"}
# a chunk of each array of a query index of the test store (`qks index`, shards of 4)
INDEX_CHUNKS = {
    "z": "z/c/1/0/0",
    "z_mean": "z_mean/c/0/0",
    "valid": "valid/c/0",
    "paths": "paths/c/1",
    "labels": "labels/c/1/0",
}


@dataclass(frozen=True)
class Pipeline:
    """A clean run of the pipeline on tiny data: stores, labels, a one-epoch checkpoint."""

    data: ImageData
    clip: TinyClip
    train: Path  # training store
    test: Path  # test store
    labels: Path  # label store
    run: Path  # `qks train` output on them
    params: Path
    work: Path


def _ok(*args: object) -> None:
    code, output, escaped = cli(*args)
    assert code == 0 and escaped is None, output


def make_pipeline(work: Path, data: ImageData, clip: TinyClip) -> Pipeline:
    """Extract (shards of 4), embed the labels and train one epoch, in this process."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    templates = work / "templates.txt"
    templates.write_text("a photo of a {}.\nthere is a {} in the scene.\n")
    stores = {split: work / f"{split}.zarr" for split in ("train", "test")}
    for split, store in stores.items():
        _ok(*extract_argv(data, clip, store, SHARD_SIZE, split))
    labels = work / "labels.zarr"
    _ok(*embed_args(SimpleNamespace(dataset=data.dataset, templates=templates), clip, labels))
    params = work / "params.yaml"
    train = dict(TRAIN_PARAMS["train"], epochs=1, batch_size=8)
    params.write_text(yaml.safe_dump({**TRAIN_PARAMS, "train": train}))
    run = work / "run"
    _ok(*train_args(stores["train"], labels, run, params))
    return Pipeline(data, clip, stores["train"], stores["test"], labels, run, params, work)


def flip_bit(path: Path, tokens: bool) -> None:
    """Flip one bit of a chunk's data: in a token shard, a byte of its first inner chunk; in a
    small array's chunk, its last byte before the crc32c."""
    raw = bytearray(path.read_bytes())
    raw[101 if tokens else -5] ^= 0x01
    path.write_bytes(bytes(raw))


@dataclass(frozen=True)
class Command:
    """A command that reads a store: its name and its arguments for a (damaged) input."""

    name: str
    argv: Callable[[Path], list[object]]


def feature_commands(p: Pipeline, work: Path) -> dict[str, Command]:
    """The commands reading a training or test store, given the damaged store."""

    def train(store: Path) -> list[object]:
        return train_args(store, p.labels, work / "out", p.params)

    def evaluate(store: Path) -> list[object]:
        args = ["evaluate", "--checkpoint", p.run, "--test-cache", store, "--labels", p.labels]
        return [*args, "--baseline", "clip", "--out", work / "metrics.json", "--device", "cpu"]

    return {
        "train": Command("qks train", train),
        "evaluate": Command("qks evaluate --baseline clip", evaluate),
        "verify": Command("qks cache verify", lambda store: ["cache", "verify", store]),
        "export": Command(
            "qks cache export-hdf5", lambda store: ["cache", "export-hdf5", store, work / "x.h5"]
        ),
    }


# which commands read each array (train reads the training store, evaluate the test store)
READERS = {
    "tokens": ("train", "evaluate", "verify", "export"),
    "labels": ("train", "evaluate", "verify", "export"),
    "valid": ("train", "evaluate", "verify", "export"),
    "paths": ("verify", "export"),
    "manifest_index": ("verify", "export"),
    "visual_proj": ("train", "evaluate", "verify", "export"),
}


def _trial(outcome: Outcome, what: str, argv: list[object], named: Path) -> None:
    """Run a command on a damaged input: refused in one line naming `named`, or wrong."""
    judge(outcome, what, *cli(*argv), named)


def judge(
    outcome: Outcome,
    what: str,
    code: int,
    output: str,
    escaped: BaseException | None,
    named: Path,
) -> None:
    """Count a command run on a bad input: survived when refused in one line naming `named`,
    wrong when it exited 0, unclear with a traceback or another message."""
    problems = error_problems(output, str(named)) if code else []
    # verify lists every problem, one a line, under a heading
    if code and what.startswith("qks cache verify"):
        problems = [] if f"{named}: " in output else [f"does not name {named}"]
        problems += ["traceback"] if "Traceback" in output else []
    if escaped is not None:
        problems.append(f"escaped {type(escaped).__name__}")
    if code == 0:
        outcome.note(f"{what}: exit 0 on a damaged input (a silent wrong result)")
    elif problems:
        outcome.note(f"{what}: {problems}: {last_line(output)[:160]}")
    outcome.add(wrong=code == 0, unclear=bool(problems), ok=not problems)


def _damaged_copy(source: Path, work: Path, key: str, kind: str) -> Path:
    """A copy of the store `source` under `work` whose chunk `key` is "missing" or "flipped"."""
    copy = work / f"{kind}_{key.replace('/', '_')}" / source.name
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(source, copy)
    if kind == "missing":
        (copy / key).unlink()
    else:
        flip_bit(copy / key, tokens=key.startswith("tokens/"))
    return copy


def damaged_feature_stores(p: Pipeline, work: Path, kind: str) -> Outcome:
    """`kind` "missing" or "flipped": one chunk of each array of the training and test stores."""
    outcome = Outcome(f"a chunk {kind} in each array of a feature store")
    commands = feature_commands(p, work)
    for name, key in FEATURE_CHUNKS.items():
        for reader in READERS[name]:
            command = commands[reader]
            source = p.test if reader == "evaluate" else p.train
            store = _damaged_copy(source, work, key, kind)
            argv = [str(a) for a in command.argv(store)]
            _trial(outcome, f"{command.name}, {name}", argv, store / key)
            outcome.where[name] += 1
    return outcome


def damaged_label_stores(p: Pipeline, work: Path, kind: str) -> Outcome:
    """`kind` "missing" or "flipped": the label store's embeddings (train, evaluate, verify) and
    the CLIP baseline's (evaluate --baseline clip, verify)."""
    outcome = Outcome(f"a chunk {kind} in each array of a label store")
    commands = feature_commands(p, work)
    readers = {
        "embeddings": ("train", "evaluate", "verify"),
        "clip_embeddings": ("evaluate", "verify"),
    }
    for name, key in LABEL_CHUNKS.items():
        for reader in readers[name]:
            labels = _damaged_copy(p.labels, work, key, kind)
            damaged = Pipeline(**{**p.__dict__, "labels": labels})
            store = p.test if reader == "evaluate" else p.train
            argv = feature_commands(damaged, work)[reader].argv(store)
            if reader == "verify":
                argv = ["cache", "verify", labels]
            _trial(
                outcome, f"{commands[reader].name}, {name}", [str(a) for a in argv], labels / key
            )
    return outcome


def lost_shard_files(p: Pipeline, work: Path) -> Outcome:
    """A done shard's token file or `valid` chunk deleted, then `qks extract` again: the shard is
    computed again (not "already complete") and the store equals the clean one; a lost chunk of
    another array is refused in one line naming it."""
    outcome = Outcome("a lost chunk, then qks extract again")
    for name, key in FEATURE_CHUNKS.items():
        store = _damaged_copy(p.train, work, key, "missing")
        code, output, escaped = cli(*extract_argv(p.data, p.clip, store, SHARD_SIZE))
        if name in ("tokens", "valid"):
            diff = compare_trees(store, p.train)
            wrong = code != 0 or "already complete" in output or not diff.equal
            if wrong:
                outcome.note(f"{name}: exit {code}, {diff.summary()}: {last_line(output)[:120]}")
            outcome.add(wrong=wrong, unclear=escaped is not None)
        else:
            judge(outcome, f"qks extract, {name}", code, output, escaped, store / key)
    return outcome


def index_commands(p: Pipeline, work: Path) -> dict[str, Command]:
    """The commands reading a query index, given the (damaged) index."""

    def evaluate(index: Path) -> list[object]:
        args = ["evaluate", "--index", index, "--labels", p.labels, "--out", work / "metrics.json"]
        return [*args, "--device", "cpu"]

    def tag(index: Path) -> list[object]:
        args = ["tag", "--index", index, "--labels", "red, circle", "--out", work / "tags.jsonl"]
        return [*args, "--device", "cpu"]

    return {
        "evaluate": Command("qks evaluate --index", evaluate),
        "tag": Command("qks tag", tag),
    }


# which commands read each array of an index (a missing chunk: every one, on opening the index)
INDEX_READERS = {
    "z": ("evaluate", "tag"),
    "z_mean": ("evaluate", "tag"),
    "valid": ("evaluate", "tag"),
    "paths": ("tag",),
    "labels": ("evaluate",),
}


def clean_index(p: Pipeline, work: Path) -> Path:
    """The query index of the test store by the pipeline's checkpoint, built once under `work`."""
    index = work / "clean_index" / "index.zarr"
    if not index.exists():
        _ok(*index_argv(p, index))
    return index


def index_argv(p: Pipeline, index: Path) -> list[object]:
    return ["index", "--checkpoint", p.run, "--cache", p.test, "--out", index, "--device", "cpu"]


def damaged_indexes(p: Pipeline, work: Path, kind: str) -> Outcome:
    """`kind` "missing" or "flipped": one chunk of each array of a query index, then each command
    that reads that array."""
    outcome = Outcome(f"a chunk {kind} in each array of a query index")
    clean = clean_index(p, work)
    commands = index_commands(p, work)
    for name, key in INDEX_CHUNKS.items():
        readers = INDEX_READERS[name] if kind == "flipped" else tuple(commands)
        for reader in readers:
            index = _damaged_copy(clean, work, key, kind)
            command = commands[reader]
            _trial(outcome, f"{command.name}, {name}", command.argv(index), index / key)
            outcome.where[name] += 1
    return outcome


def lost_index_chunks(p: Pipeline, work: Path) -> Outcome:
    """A done shard's z chunk deleted, then `qks index` again: the shard is computed again (not
    "already complete") and the index equals the clean one; a lost chunk of another array is
    refused in one line naming it."""
    outcome = Outcome("a lost index chunk, then qks index again")
    clean = clean_index(p, work)
    for name, key in INDEX_CHUNKS.items():
        index = _damaged_copy(clean, work, key, "missing")
        code, output, escaped = cli(*index_argv(p, index))
        if name == "z":
            diff = compare_trees(index, clean)
            wrong = code != 0 or "already complete" in output or not diff.equal
            if wrong:
                outcome.note(f"{name}: exit {code}, {diff.summary()}: {last_line(output)[:120]}")
            outcome.add(wrong=wrong, unclear=escaped is not None)
        else:
            judge(outcome, f"qks index, {name}", code, output, escaped, index / key)
    return outcome
