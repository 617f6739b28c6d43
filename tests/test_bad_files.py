"""Bad files where weights belong: empty, random bytes, truncated, a pickle that would run code.

Each is refused in one line naming the file and what is wrong (exit 1, no traceback), no code in a
pickle runs, and the `--trust-pickle` hint appears only where the flag applies.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qks_pipeline.cli import main
from qks_pipeline.config import ModelConfig, Params, TrainConfig
from qks_pipeline.stage_two.train import train
from qks_pipeline.store.synthetic import make_synthetic
from tests.tiny import embed_args, extract_args

KINDS = ["empty", "random", "truncated", "pickle", "torch_pickle"]


class RunsCode:
    """Unpickled, it would create the file `path`: proof that code from the pickle ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def bad_file(directory: Path, kind: str, good: Path | None = None, suffix: str = ".pt") -> Path:
    """A file of `kind` at `directory/<kind><suffix>`; `truncated` keeps half of `good`."""
    path = directory / f"{kind}{suffix}"
    marker = directory / "code_ran"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": RunsCode(marker)}))
    else:
        torch.save({"weight": torch.zeros(2), "hook": RunsCode(marker)}, path)
    return path


def one_error_line(args: list[object]) -> str:
    """Run `qks ARGS`: it must fail with exit 1 and one `Error:` line, no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error: ")]
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    return lines[0]


def check(line: str, path: Path, kind: str, made_in: Path | None = None) -> None:
    """The line names the file and what is wrong, and no code from the file (made by `bad_file`
    in `made_in`, by default the file's directory) ran."""
    words = {
        "empty": "empty file (0 bytes)",
        "random": "not a weights file",
        "truncated": "truncated",
        "pickle": "holds objects other than tensors",
        "torch_pickle": "holds objects other than tensors",
    }
    prefix = f"Error: {path}: "
    assert line.startswith(prefix) and words[kind] in line[len(prefix) :], line
    assert not ((made_in or path.parent) / "code_ran").exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic stores and a one-epoch checkpoint."""
    root = tmp_path_factory.mktemp("bad_files")
    data = make_synthetic(root, num_train=64, num_test=16, shard_size=32)
    model = ModelConfig(num_queries=2, num_layers=1, num_heads=2, ff_dim=16)
    p = Params(model=model, train=TrainConfig(epochs=1, batch_size=16, val_fraction=0.25))
    train(
        data.train,
        data.labels,
        root / "ckpt",
        params=p,
        device="cpu",
        progress_bar=False,
        echo=lambda _: None,
    )
    return data, root / "ckpt"


@pytest.mark.parametrize("kind", [*KINDS, "safetensors"])
def test_import_checkpoint_refuses_what_is_no_checkpoint(tmp_path, tiny_clip, kind):
    suffix = ".safetensors" if kind == "safetensors" else ".pth"
    path = bad_file(
        tmp_path, "random" if kind == "safetensors" else kind, tiny_clip.weights, suffix
    )
    line = one_error_line(["import-checkpoint", path, "--out", tmp_path / "out"])
    if kind == "safetensors":
        assert "not a whole safetensors file" in line
    else:
        check(line, path, kind)
    # the flag can help a pickle of other objects only, never a damaged file
    assert ("--trust-pickle" in line) == (kind in ("pickle", "torch_pickle")), line
    assert "trust_pickle=True" not in line and not (tmp_path / "out" / "best.safetensors").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_extract_and_embed_labels_refuse_bad_backbone_weights(
    tmp_path, sample_dataset, tiny_clip, kind
):
    path = bad_file(tmp_path, kind, tiny_clip.weights)
    weights = (tiny_clip.config, path)
    check(one_error_line(extract_args(sample_dataset, weights, tmp_path / "s.zarr")), path, kind)
    check(one_error_line(embed_args(sample_dataset, weights, tmp_path / "l.zarr")), path, kind)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "l.zarr").exists()


def test_weights_that_are_no_state_dict_are_one_line(tmp_path, sample_dataset, tiny_clip):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    weights = (tiny_clip.config, tmp_path / "list.pt")
    line = one_error_line(extract_args(sample_dataset, weights, tmp_path / "s.zarr"))
    assert f"{tmp_path / 'list.pt'}: not a state dict of TinyCLIP-test weights" in line


@pytest.mark.parametrize("kind", KINDS)
def test_predict_refuses_bad_backbone_weights(tmp_path, run, sample_dataset, tiny_clip, kind):
    _, ckpt = run
    path = bad_file(tmp_path, kind, tiny_clip.weights)
    image = next((sample_dataset.images / "test").iterdir())
    args = ["predict", "--checkpoint", ckpt, "--model", tiny_clip.config, "--pretrained", path]
    check(one_error_line([*args, "--labels", "red", "--device", "cpu", image]), path, kind)


@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_evaluate_and_predict_refuse_a_damaged_best_safetensors(
    tmp_path, run, sample_dataset, tiny_clip, kind
):
    data, ckpt = run
    damaged = shutil.copytree(ckpt, tmp_path / "ckpt")
    best = damaged / "best.safetensors"
    bad_file(tmp_path, kind, best, ".safetensors").replace(best)
    args = ["evaluate", "--checkpoint", damaged, "--test-cache", data.test, "--labels", data.labels]
    line = one_error_line([*args, "--out", tmp_path / "m.json", "--device", "cpu"])
    what = "empty file" if kind == "empty" else "not a whole safetensors file"
    assert line.startswith(f"Error: {best}: cannot read the checkpoint's weights: {what}"), line
    assert not (tmp_path / "m.json").exists()
    image = next((sample_dataset.images / "test").iterdir())
    args = ["predict", "--checkpoint", damaged, "--model", tiny_clip.config]
    args += ["--pretrained", tiny_clip.weights, "--labels", "red", "--device", "cpu", image]
    assert one_error_line(args).startswith(f"Error: {best}: cannot read the checkpoint's weights")


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_resume_point_is_refused_in_one_line(tmp_path, run, kind):
    data, ckpt = run
    out = shutil.copytree(ckpt, tmp_path / "ckpt")
    state = out / "last_state.pt"
    bad_file(tmp_path, kind, state).replace(state)
    params = tmp_path / "params.yaml"
    params.write_text(
        "model: {num_queries: 2, num_layers: 1, num_heads: 2, ff_dim: 16}\n"
        "train: {epochs: 2, batch_size: 16, val_fraction: 0.25}\n"
    )
    args = ["train", "--train-cache", data.train, "--labels", data.labels, "--out", out]
    line = one_error_line([*args, "--params", params, "--device", "cpu", "--no-progress"])
    check(line, state, kind, made_in=tmp_path)
    assert "--no-resume" in line and "Invalid argument" not in line
