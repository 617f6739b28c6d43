"""The command line's edge: one override mechanism (`--set`), checked like params.yaml; outputs and
devices refused in one line before any work."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from qks_pipeline.cli import main
from qks_pipeline.config import load_params
from qks_pipeline.errors import QKSError


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_set_overrides_params_yaml_and_reads_values_as_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 1.0e-4\n  epochs: 3\nevaluate:\n  top_k: [3, 5]\n")
    p = load_params(params, ["train.lr=3e-5", "evaluate.top_k=[10, 20]", "model.keep_cls=false"])
    assert (p.train.lr, p.train.epochs, p.evaluate.top_k, p.model.keep_cls) == (
        3e-5,
        3,
        [10, 20],
        False,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=fast", "'train.lr' must be float, got 'fast'"),
        ("train.learning_rate=1", "unknown key(s) in section 'train': learning_rate"),
        ("trainlr=1", "expected SECTION.KEY=VALUE"),
        ("model.num_queries=true", "'model.num_queries' must be int, got True"),
        ("evaluate.top_k=[3, x]", "'evaluate.top_k' must be int, got 'x'"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(override, message):
    with pytest.raises(QKSError) as e:
        load_params(None, [override])
    assert message in e.value.message and "\n" not in e.value.message


def test_train_refuses_bad_overrides_and_output_paths_before_any_work(tmp_path):
    store = tmp_path / "store.zarr"
    store.mkdir()
    code, out = _run(
        "train", "--train-cache", store, "--labels", store, "--out", tmp_path / "o", "--set", "x=1"
    )
    assert code != 0 and "expected SECTION.KEY=VALUE" in out
    (tmp_path / "file").write_text("")
    code, out = _run("train", "--train-cache", store, "--labels", store, "--out", tmp_path / "file")
    assert code == 2 and "file" in out and "is a file" in out
    code, out = _run(
        "evaluate",
        "--baseline",
        "clip",
        "--test-cache",
        store,
        "--labels",
        store,
        "--out",
        tmp_path,
    )
    assert code == 2 and "is a directory" in out


def test_an_unknown_device_is_one_line(tmp_path):
    store = tmp_path / "store.zarr"
    store.mkdir()
    args = [
        "--baseline",
        "clip",
        "--test-cache",
        store,
        "--labels",
        store,
        "--out",
        tmp_path / "m.json",
    ]
    code, out = _run("evaluate", *args, "--device", "gpu")
    assert (
        code == 1
        and out.strip() == "Error: --device gpu: not a device (use auto, cpu, cuda or cuda:N)"
    )


def test_import_checkpoint_no_cls_marks_an_rmcls_run(tiny_clip, tmp_path):
    import torch

    from qks_pipeline.stage_one.backbone import load_backbone
    from qks_pipeline.stage_two.checkpoint import load
    from tests.qks_reference_impl import random_reference_state

    clip_state = load_backbone(str(tiny_clip.config), "none").model.state_dict()
    # the tiny CLIP's width 64 and embedding size 32
    raw = random_reference_state(2, 3, 64, 32, 16, seed=1)
    raw |= {f"clip_model.{k}": v for k, v in clip_state.items() if k != "visual.proj"}
    torch.save(raw, tmp_path / "ref.pth")
    (tmp_path / "args.json").write_text('{"rmcls": true, "num_query": 3}')
    (tmp_path / "args.yaml").write_text("rmcls: false\n")
    run_args = [["--run-args", tmp_path / name] for name in ("args.json", "args.yaml")]
    for i, (flag, keep_cls) in enumerate(
        [(["--no-cls"], False), ([], True), (run_args[0], False), (run_args[1], True)]
    ):
        out = tmp_path / f"ck{i}"
        args = ["--model", tiny_clip.config, "--num-heads", 2, *flag]
        code, output = _run("import-checkpoint", tmp_path / "ref.pth", "--out", out, *args)
        assert code == 0, output
        assert load(out, torch.device("cpu"))[0].cfg.keep_cls is keep_cls
    (tmp_path / "list.json").write_text("[1, 2]")
    code, output = _run(
        "import-checkpoint",
        tmp_path / "ref.pth",
        "--out",
        tmp_path / "x",
        "--run-args",
        tmp_path / "list.json",
    )
    assert code == 1 and "list.json: the run's arguments must be a mapping" in output
