"""Every value of params.yaml and `--set` checked in one place: types, bounds (a field's `bounded`),
finiteness, non-empty lists; a refusal is one line naming the key, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from click.testing import CliRunner

from qks_pipeline.cli import main
from qks_pipeline.config import Bound, Params, load_params
from qks_pipeline.errors import QKSError

SECTIONS = typing.get_type_hints(Params)


def _bounded_fields() -> list[tuple[str, Bound, type]]:
    """(section.key, bound, number type) of every bounded field."""
    out = []
    for name, section in SECTIONS.items():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            if "bound" in f.metadata:
                kind = float if hints[f.name] is float else int
                out.append((f"{name}.{f.name}", f.metadata["bound"], kind))
    return out


BOUNDED = _bounded_fields()


def _outside(bound: Bound, kind: type) -> list[float]:
    """Values just outside `bound` on each side that has a limit."""
    step = 1 if kind is int else 1e-9
    values = []
    if bound.low is not None:
        values.append(bound.low if bound.low_open else bound.low - step)
    if bound.high is not None:
        values.append(bound.high if bound.high_open else bound.high + step)
    return values


def _inside(bound: Bound, kind: type) -> list[float]:
    """The limits themselves where they are allowed, else a step inside."""
    step = 1 if kind is int else 1e-9
    values = [bound.low + step if bound.low_open else bound.low]
    if bound.high is not None:
        values.append(bound.high - step if bound.high_open else bound.high)
    return values


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(QKSError) as e:
        load_params(None, overrides)
    assert "\n" not in e.value.message
    return e.value.message


def test_every_number_and_list_field_declares_a_bound():
    for name, section in SECTIONS.items():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            hint = hints[f.name]
            numeric = {int, float, list} & {hint, typing.get_origin(hint), *typing.get_args(hint)}
            if numeric:
                assert "bound" in f.metadata, f"{name}.{f.name} has no bound"


@pytest.mark.parametrize(("key", "bound", "kind"), BOUNDED, ids=[k for k, _, _ in BOUNDED])
def test_a_value_outside_its_bound_is_one_line_naming_key_value_and_range(key, bound, kind):
    section = key.split(".")[0]
    for value in _outside(bound, kind):
        shown = f"[{value}]" if key == "evaluate.top_k" else str(value)
        message = _refusal([f"{key}={shown}"])
        assert message.startswith(f"--set: {key} = ") and str(bound) in message, message
        assert repr(kind(value)) in message, message
    for value in _inside(bound, kind):
        shown = f"[{value}]" if key == "evaluate.top_k" else str(value)
        got = getattr(getattr(load_params(None, [f"{key}={shown}"]), section), key.split(".")[1])
        assert got == ([value] if key == "evaluate.top_k" else value)


@pytest.mark.parametrize(
    ("key", "bound", "kind"),
    [b for b in BOUNDED if b[2] is float],
    ids=[k for k, _, kind in BOUNDED if kind is float],
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf"])
def test_every_float_must_be_finite(key, bound, kind, value):
    message = _refusal([f"{key}={value}"])
    assert f"{key} = " in message and "must be finite" in message, message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1", "train.lr = -1.0: must be finite and > 0"),
        ("train.lr=nan", "train.lr = nan: must be finite and > 0"),
        ("train.lr=inf", "train.lr = inf: must be finite and > 0"),
        ("train.lr=0", "train.lr = 0.0: must be finite and > 0"),
        ("train.weight_decay=-1", "train.weight_decay = -1.0: must be finite and >= 0"),
        ("model.dropout=1.5", "model.dropout = 1.5: must be finite and in [0, 1)"),
        ("model.num_queries=0", "model.num_queries = 0: must be >= 1"),
        ("model.ff_dim=0", "model.ff_dim = 0: must be >= 1"),
        ("model.num_heads=0", "model.num_heads = 0: must be >= 1"),
        ("train.nproc=0", "train.nproc = 0: must be >= 1"),
        ("train.plateau_patience=-1", "train.plateau_patience = -1: must be >= 0"),
        ("train.seed=-1", "train.seed = -1: must be in [0, 4294967295]"),
        ("evaluate.batch_size=0", "evaluate.batch_size = 0: must be >= 1"),
        ("evaluate.top_k=[0]", "evaluate.top_k = [0]: each item must be >= 1"),
        ("evaluate.top_k=[3, -5]", "evaluate.top_k = [3, -5]: each item must be >= 1"),
        ("evaluate.top_k=[]", "evaluate.top_k = []: must be a non-empty list of numbers >= 1"),
        ("extract.shard_size=0", "extract.shard_size = 0: must be >= 1"),
        ("extract.workers=-1", "extract.workers = -1: must be >= 0"),
        ("extract.views=-1", "extract.views = -1: must be >= 0"),
        ("extract.max_pixels=0", "extract.max_pixels = 0: must be >= 1"),
        ("index.max_labels=0", "index.max_labels = 0: must be >= 1"),
    ],
)
def test_the_issues_cases_are_refused_by_set_and_by_the_params_file(tmp_path, override, message):
    assert _refusal([override]) == f"--set: {message}"
    key, value = override.split("=")
    section, name = key.split(".")
    params = tmp_path / "params.yaml"
    params.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(QKSError) as e:
        load_params(params)
    assert e.value.message == f"{params}: {message}"


def test_a_type_error_names_the_key_without_a_prefix():
    assert _refusal(["train.lr=fast"]) == "--set: 'train.lr' must be float, got 'fast'"
    assert "unknown section(s): trian" in _refusal(["trian.lr=1"])


@pytest.fixture
def wide80(tmp_path):
    """An open_clip model config whose vision tower is 80 wide (5 divides it; 768 it does not)."""
    config = tmp_path / "Wide80.json"
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"width": 80}, "text_cfg": {}}))
    return config


def test_num_heads_is_checked_against_the_backbone_the_run_uses(tmp_path, wide80):
    params = tmp_path / "params.yaml"
    params.write_text(f"backbone:\n  model: {wide80}\n")
    assert load_params(params, ["model.num_heads=5"]).model.num_heads == 5
    assert load_params(None, [f"backbone.model={wide80}", "model.num_heads=5"]).model.num_heads == 5
    # the default backbone (ViT-B-16, 768 wide) is not this run's
    message = _refusal(["model.num_heads=5"])
    assert message == (
        "--set: model.num_heads = 5: must divide 768, the width of backbone.model ViT-B-16 "
        "(or be auto)"
    )
    params.write_text(f"backbone:\n  model: {wide80}\nmodel:\n  num_heads: 3\n")
    with pytest.raises(QKSError) as e:
        load_params(params)
    assert e.value.message.startswith(f"{params}: model.num_heads = 3: must divide 80, the width")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"train:\n  lr: 1e-4 \xff\xfe\n", "params file is not UTF-8 text (byte 18)"),
        (b"- train\n- model\n", "params file must be a mapping of sections"),
        (b"3\n", "params file must be a mapping of sections"),
        (b"", "params file is empty (leave out --params for the defaults)"),
        (b"# only a comment\n", "params file is empty (leave out --params for the defaults)"),
        (b"1: 2\ntrain: {}\n", "unknown section(s): 1"),
        (b"train: 3\n", "section 'train' must be a mapping"),
        (b"train:\n  1: 2\n", "unknown key(s) in section 'train': 1"),
    ],
)
def test_a_bad_params_file_is_one_line(tmp_path, content, message):
    params = tmp_path / "params.yaml"
    params.write_bytes(content)
    with pytest.raises(QKSError) as e:
        load_params(params)
    assert e.value.message.startswith(f"{params}: {message}") and "\n" not in e.value.message


def test_pipeline_sections_alone_mean_the_defaults(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("dataset: manifest\ndata:\n  images: x\n")
    assert load_params(params) == Params()


@pytest.mark.parametrize(
    "override", ["train.lr=-1", "train.lr=nan", "evaluate.top_k=[0]", "train.nproc=0"]
)
def test_the_command_line_refuses_a_bad_value_in_one_line_before_any_work(tmp_path, override):
    store = tmp_path / "store.zarr"
    store.mkdir()
    args = ["--train-cache", store, "--labels", store, "--out", tmp_path / "out"]
    result = CliRunner().invoke(main, ["train", *map(str, args), "--set", override])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: --set: ") and override.split("=")[0] in lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out").exists()


def test_a_params_file_that_is_not_utf8_is_one_cli_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(b"\xff\xfe\x00t")
    store = tmp_path / "store.zarr"
    store.mkdir()
    args = ["--train-cache", store, "--labels", store, "--out", tmp_path / "out"]
    result = CliRunner().invoke(main, ["train", *map(str, args), "--params", str(params)])
    assert result.exit_code == 1 and "not UTF-8 text" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
