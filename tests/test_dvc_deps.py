"""dvc.yaml's code dependencies are the import closure of each stage's command, computed with ast: a
stage depends on every module its command may load, and on nothing else of the package."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from qks_pipeline.cli import main
from tests.import_graph import REPO, package_files, package_imports
from tests.import_graph import closure as import_closure

CLI_PACKAGE = "qks_pipeline.cli"


def _stages() -> dict[str, dict]:
    """dvc.yaml's stages, `foreach` ones expanded (their `${item}` filled in)."""
    stages = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage:
            stages[name] = stage
            continue
        for item in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${item}", str(item))
            stages[f"{name}@{item}"] = yaml.safe_load(text)
    return stages


def _command(cmd: str) -> str:
    """The `qks` command a stage runs: `qks NAME ...` or `python -m stages NAME ...`."""
    match = re.match(r"\s*(?:qks|python -m stages)\s+([\w-]+)", cmd)
    assert match, f"a stage command that is not a qks command: {cmd}"
    return match.group(1)


def code_closure(command: str) -> set[Path]:
    """The files of every package module that `qks COMMAND` may load: the CLI's modules as imported
    (their top level), the command's own function, and all that those import, lazily or not."""
    callback = main.commands[command].callback
    imports = package_imports()
    cli_modules = {name for name in imports if name.startswith(CLI_PACKAGE)}
    start = {CLI_PACKAGE, *imports[callback.__module__].in_function.get(callback.__name__, ())}
    files = package_files()
    return {files[name] for name in import_closure(start, imports, top_only=cli_modules)}


def _covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO)
    return any(relative == Path(d) or Path(d) in relative.parents for d in deps)


def test_every_stage_depends_on_the_modules_its_command_loads():
    missing = {}
    for name, stage in _stages().items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        code = code_closure(_command(stage["cmd"]))
        if gaps := sorted(str(p.relative_to(REPO)) for p in code if not _covered(p, deps)):
            missing[name] = gaps
    assert missing == {}


def test_no_stage_depends_on_code_its_command_does_not_load():
    """A dependency on a module outside the closure would rerun a stage for nothing."""
    extra = {}
    for name, stage in _stages().items():
        code = code_closure(_command(stage["cmd"]))
        for dep in stage.get("deps", []):
            path = REPO / dep
            if path.suffix != ".py" and not path.is_dir() or not dep.startswith("qks_pipeline"):
                continue
            modules = [path] if path.is_file() else list(path.rglob("*.py"))
            if outside := sorted(str(m.relative_to(REPO)) for m in modules if m not in code):
                extra[f"{name}: {dep}"] = outside
    assert extra == {}


def test_the_closure_follows_lazy_imports():
    """`qks train` loads the trainer only inside its function; the closure still has it and the
    metrics module the trainer selects checkpoints with."""
    code = code_closure("train")
    package = REPO / "qks_pipeline"
    assert package / "stage_two" / "train.py" in code
    assert package / "stage_two" / "metrics.py" in code
    assert package / "stage_one" / "extract.py" not in code
