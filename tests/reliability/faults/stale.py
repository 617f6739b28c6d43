"""Stale caches: train, evaluate and extract each given an input built with other weights,
another model config, another manifest or a future format version. Every combination must be
refused with one line naming the difference, changing nothing."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tests.reliability.faults.outcome import Outcome
from tests.reliability.faults.training import TRAIN_PARAMS
from tests.reliability.harness import (
    ImageData,
    cli,
    error_problems,
    extract_argv,
    last_line,
    store_files,
)
from tests.tiny import TINY_CONFIG, TinyClip, embed_args, make_tiny_clip, train_args

# a store format this code does not know
FUTURE_VERSION = 99


@dataclass(frozen=True)
class StaleSetup:
    """Caches built with weights A (train, test, labels, a trained run) and with other inputs."""

    data: ImageData
    clip: TinyClip  # weights A
    other: TinyClip  # weights B, same config
    wide: TinyClip  # another config under the same model name
    train_a: Path
    test_a: Path
    labels_a: Path
    run_a: Path  # `qks train` output on train_a + labels_a
    train_b: Path
    test_b: Path
    labels_b: Path
    labels_vocab: Path  # weights A, another vocabulary
    params: Path
    work: Path


@dataclass(frozen=True)
class StaleCase:
    name: str
    argv: list[str]
    field: str  # what the refusal must name
    guarded: tuple[Path, ...]  # stores or directories that the refusal must leave unchanged


# ---------------------------------------------------------------------------------------- the setup
def _ok(*args: object) -> None:
    code, output, escaped = cli(*args)
    assert code == 0 and escaped is None, output


def _embed(data: ImageData, clip: TinyClip, out: Path, templates: Path) -> Path:
    _ok(*embed_args(SimpleNamespace(dataset=data.dataset, templates=templates), clip, out))
    return out


def wide_config(work: Path) -> Path:
    """The tiny config with one more vision layer, under the same file name (so model name)."""
    config = json.loads(TINY_CONFIG.read_text())
    config["vision_cfg"]["layers"] = 3
    path = work / "wide" / TINY_CONFIG.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def make_stale_setup(work: Path, data: ImageData, clip: TinyClip, other: TinyClip) -> StaleSetup:
    """Extract, embed and train (1 epoch) in this process; about 10 s with the tiny model."""
    import yaml

    templates = work / "templates.txt"
    templates.write_text("a photo of a {}.\nthere is a {} in the scene.\n")
    # train_a, test_a, train_b, test_b
    stores = {}
    for weights, c in (("a", clip), ("b", other)):
        for split in ("train", "test"):
            store = stores[f"{split}_{weights}"] = work / f"{split}_{weights}.zarr"
            _ok(*extract_argv(data, c, store, 4, split))
    vocab = ImageData(work / "vocab", data.images)
    shutil.copytree(data.dataset, vocab.dataset)
    (vocab.dataset / "unseen.txt").write_text("yellow\ntriangle\nhexagon\n")
    params = work / "params.yaml"
    train = dict(TRAIN_PARAMS["train"], epochs=1, batch_size=8)
    params.write_text(
        yaml.safe_dump({**TRAIN_PARAMS, "model": dict(TRAIN_PARAMS["model"]), "train": train})
    )
    setup = StaleSetup(
        data=data,
        clip=clip,
        other=other,
        wide=make_tiny_clip(work / "wide", config=wide_config(work)),
        labels_a=_embed(data, clip, work / "labels_a.zarr", templates),
        labels_b=_embed(data, other, work / "labels_b.zarr", templates),
        labels_vocab=_embed(vocab, clip, work / "labels_v.zarr", templates),
        run_a=work / "run_a",
        params=params,
        work=work,
        **stores,
    )
    _ok(*train_args(setup.train_a, setup.labels_a, setup.run_a, params))
    return setup


# ---------------------------------------------------------------------------------------- the cases
def _copy_with_version(store: Path, out: Path, version: int) -> Path:
    shutil.copytree(store, out, dirs_exist_ok=True)
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["fingerprint"]["format_version"] = version
    (out / "zarr.json").write_text(json.dumps(meta))
    return out


def _other_manifest(s: StaleSetup) -> ImageData:
    """The manifest with one image fewer."""
    other = ImageData(s.work / "manifest2", s.data.images)
    shutil.copytree(s.data.dataset, other.dataset, dirs_exist_ok=True)
    lines = (other.dataset / "train.jsonl").read_text().splitlines()
    (other.dataset / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    return other


def stale_cases(s: StaleSetup) -> list[StaleCase]:
    """Train, evaluate and extract, each given an input built unlike what it is combined with."""

    def train(cache: Path, labels: Path, out: Path, *extra: object) -> list[str]:
        return train_args(cache, labels, out, s.params, *extra)

    def evaluate(test: Path, labels: Path) -> list[str]:
        args = ["evaluate", "--checkpoint", s.run_a, "--test-cache", test, "--labels", labels]
        return [str(a) for a in [*args, "--out", s.work / "metrics.json", "--device", "cpu"]]

    future_train = _copy_with_version(s.train_a, s.work / "future_train.zarr", FUTURE_VERSION)
    future_test = _copy_with_version(s.test_a, s.work / "future_test.zarr", FUTURE_VERSION)
    future_labels = _copy_with_version(s.labels_a, s.work / "future_labels.zarr", FUTURE_VERSION)
    resumed = s.work / "run_a_resumed"
    shutil.copytree(s.run_a, resumed, dirs_exist_ok=True)
    w = "weights_sha256"
    return [
        StaleCase(
            "train: label embeddings of other weights",
            train(s.train_a, s.labels_b, s.work / "t1"),
            w,
            (),
        ),
        StaleCase(
            "train: test cache of other weights",
            train(s.train_a, s.labels_a, s.work / "t2", "--test-cache", s.test_b),
            w,
            (),
        ),
        StaleCase(
            "train: resume a run of other weights",
            train(s.train_b, s.labels_b, resumed),
            "fingerprint",
            (resumed,),
        ),
        StaleCase(
            "train: cache of a future format version",
            train(future_train, s.labels_a, s.work / "t3"),
            "format version",
            (),
        ),
        StaleCase(
            "train: labels of a future format version",
            train(s.train_a, future_labels, s.work / "t4"),
            "format version",
            (),
        ),
        StaleCase(
            "evaluate: checkpoint vs test cache of other weights",
            evaluate(s.test_b, s.labels_b),
            w,
            (),
        ),
        StaleCase(
            "evaluate: label embeddings of other weights", evaluate(s.test_a, s.labels_b), w, ()
        ),
        StaleCase(
            "evaluate: label embeddings of another vocabulary",
            evaluate(s.test_a, s.labels_vocab),
            "label 7 is 'hexagon'",
            (),
        ),
        StaleCase(
            "evaluate: test cache of a future format version",
            evaluate(future_test, s.labels_a),
            "format version",
            (),
        ),
        StaleCase(
            "extract: store of other weights",
            extract_argv(s.data, s.other, s.train_a, 4),
            w,
            (s.train_a,),
        ),
        StaleCase(
            "extract: store of another manifest",
            extract_argv(_other_manifest(s), s.clip, s.train_a, 4),
            "manifest_sha256",
            (s.train_a,),
        ),
        StaleCase(
            "extract: store of another model config",
            extract_argv(s.data, s.wide, s.train_a, 4),
            "model_config_sha256",
            (s.train_a,),
        ),
        StaleCase(
            "extract: store of a future format version",
            extract_argv(s.data, s.clip, future_train, 4),
            "format version",
            (future_train,),
        ),
    ]


def run_stale_case(case: StaleCase) -> tuple[bool, bool, list[str], str]:
    """(refused, unchanged, problems with the message, the error line)."""
    before = [store_files(p) for p in case.guarded]
    code, output, escaped = cli(*case.argv)
    problems = error_problems(output) + ([f"escaped {type(escaped).__name__}"] if escaped else [])
    line = next(
        (x for x in reversed(output.splitlines()) if x.startswith("Error: ")), last_line(output)
    )
    if case.field not in line:
        problems.append(f"the error does not name {case.field!r}")
    unchanged = before == [store_files(p) for p in case.guarded]
    return code == 1, unchanged, problems, line


def stale_inputs(setup: StaleSetup) -> Outcome:
    """Every stale combination is refused with one line naming the difference, changing nothing."""
    outcome = Outcome("stale cache (backbone, manifest, format version)")
    for case in stale_cases(setup):
        refused, unchanged, problems, line = run_stale_case(case)
        if problems or not refused or not unchanged:
            outcome.note(
                f"{case.name}: refused {refused}, unchanged {unchanged}, {problems}: {line[:160]}"
            )
        outcome.add(lost=not unchanged, wrong=not refused, unclear=bool(problems), ok=not problems)
    return outcome
