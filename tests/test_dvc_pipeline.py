"""The DVC pipeline end to end, in a temporary git repository holding a copy of the project.

Exactly the README's main job (`dvc repro` on the bundled sample) except for the backbone, which is
the tiny random open_clip model saved to a local file, and the head and epochs, which are shrunk so
the run takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COPY = [
    "dvc.yaml",
    "params.yaml",
    "stages",
    "data_manifests",
    "qks_pipeline",
    ".dvc/config",
    ".dvcignore",
]


def sh(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        # the venv's `qks` and `dvc`
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def set_params(repo: Path, **sections: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_clip: tuple[Path, Path]) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    for name in COPY:
        src, dst = REPO / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    config, weights = tiny_clip
    set_params(
        repo,
        backbone={"model": str(config), "pretrained": str(weights)},
        extract={"workers": 0, "batch_size": 64},
        model={"num_queries": 3, "num_layers": 1, "num_heads": 2, "ff_dim": 64},
        train={"epochs": 2, "batch_size": 32, "lr": 1e-3},
    )
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "project copy")
    return repo


@pytest.mark.slow
def test_repro_runs_everything_then_nothing(repo: Path) -> None:
    sh(repo, "dvc", "repro")
    for name in ("qks", "clip"):
        metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        for setting in ("zsl", "gzsl"):
            value = metrics[setting]["mAP"]
            assert isinstance(value, float) and 0.0 < value <= 1.0, (name, setting, value)
    # the paper's 14 numbers a file (ZSL and GZSL: mAP, P/R/F1@3 and @5), without counts or notes
    shown = sh(repo, "dvc", "metrics", "show").splitlines()
    assert max(map(len, shown)) < 200 and len(shown) == 3, shown
    assert "seen" not in shown[0] and "num_images" not in shown[0] and "template" not in shown[0]
    # header + 2 epochs
    assert (repo / "models" / "qks" / "train_log.csv").read_text().count("\n") >= 3
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status")
    out = sh(repo, "dvc", "repro")
    assert "didn't change, skipping" in out and "Running stage" not in out


@pytest.mark.slow
def test_training_param_reruns_the_stages_after_training_only(repo: Path) -> None:
    set_params(repo, train={"lr": 5e-4})
    out = sh(repo, "dvc", "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # the index of the test store and the search pages come from the trained head too
    searches = {"search@boat", "search@horse", "search@cake"}
    assert ran == {"train", "evaluate", "index", *searches}, out


@pytest.mark.slow
def test_exp_run_sweeps_a_parameter(repo: Path) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "lr 5e-4")
    out = sh(repo, "dvc", "exp", "run", "-S", "model.num_queries=2")
    assert "Running stage 'train'" in out and "Running stage 'extract" not in out, out
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["num_queries"] == 2
    assert math.isfinite(json.loads((repo / "metrics" / "qks.json").read_text())["zsl"]["mAP"])
    # the experiment is recorded
    assert len(sh(repo, "dvc", "exp", "list", "--name-only").split()) == 1


@pytest.mark.slow
def test_plots_render_offline_as_images(repo: Path) -> None:
    sh(repo, "dvc", "repro")  # nothing to do after the first test
    sh(repo, "dvc", "plots", "show", "-o", "plots_html")
    page = (repo / "plots_html" / "index.html").read_text()
    # nothing loaded from a CDN
    assert "<img" in page and "http://" not in page and "https://" not in page
    for png in ("models/qks/train_curves.png", "metrics/per_label_ap.png"):
        assert (repo / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.slow
def test_exp_run_reproduces_the_papers_protocol(repo: Path) -> None:
    out = sh(
        repo, "dvc", "exp", "run", "-S", "train.selection=test", "-S", "evaluate.protocol=reference"
    )
    assert "Running stage 'train'" in out and "selected on the TEST set" in out, out
    details = json.loads((repo / "metrics" / "qks_details.json").read_text())
    assert (
        details["selection"] == "test"
        and details["protocol"] == "reference"
        and "warning" in details
    )
    config = json.loads((repo / "models" / "qks" / "config.json").read_text())
    assert "test" in json.dumps(config)


def _changed_stages(repo: Path) -> set[str]:
    """The stages `dvc status` lists as changed (its lines `NAME:` at the start)."""
    out = sh(repo, "dvc", "status")
    return {line[:-1] for line in out.splitlines() if line.endswith(":") and not line[0].isspace()}


@pytest.mark.slow
def test_a_code_edit_marks_the_stages_that_import_it(repo: Path) -> None:
    """Editing metrics.py (which training uses to select its checkpoint) changes train and both
    evaluations; editing a stage-one module reruns extract, which finds its stores complete."""
    sh(repo, "dvc", "repro")
    metrics = repo / "qks_pipeline" / "stage_two" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n# an edit\n")
    changed = _changed_stages(repo)
    assert {"train", "evaluate", "baseline_clip"} <= changed, changed
    assert not changed & {"prepare", "embed_labels", "extract@train", "extract@test"}, changed
    images = repo / "qks_pipeline" / "data" / "images.py"
    images.write_text(images.read_text() + "\n# an edit\n")
    assert {"extract@train", "extract@test"} <= _changed_stages(repo)
    out = sh(repo, "dvc", "repro", "--single-item", "extract@train")
    assert "already complete" in out, out


def test_dvc_plots_page_is_not_tracked_by_git() -> None:
    """`dvc plots show` writes dvc_plots/index.html into the working tree."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=REPO, capture_output=True
    )
    assert ignored.returncode == 0
