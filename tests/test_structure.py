"""The package's shape: imports flow one way (no circles, lazy imports included), click only at the CLI edge, the
formatter never switched off, and every document the code cites is in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qks_pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(package modules imported anywhere in the file, top-level names of third-party imports)."""
    own, external = set(), set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] != "qks_pipeline":
                external.add(name.split(".")[0])
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != _module_name(path):
                own.add(name)
    return own, external


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    pairs = {name: _imports(path, set(files)) for name, path in files.items()}
    # importing a package runs its __init__, but `from pkg import sub` does not make pkg depend on its children
    graph = {name: {m for m in own if not name.startswith(m + ".")} for name, (own, _) in pairs.items()}
    return graph, {name: external for name, (_, external) in pairs.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    graph, _ = _graph()
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_the_cycle_finder_finds_a_lazy_import_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_cli_imports_click():
    _, external = _graph()
    outside = sorted(m for m, names in external.items() if "click" in names and not m.startswith("qks_pipeline.cli"))
    assert outside == []


def test_the_formatter_is_never_switched_off():
    """No Python file of the repository (outside hidden folders such as .venv) turns ruff format off, for a line
    (fmt: skip) or a block (fmt: off)."""
    switch = re.compile(r"#\s*fmt:\s*(skip|off)\b")
    files = [p for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    skipped = [str(p.relative_to(REPO)) for p in files if switch.search(p.read_text())]
    assert skipped == []


def test_every_cited_document_is_in_the_repository():
    cited = set()
    for path in [*PACKAGE.rglob("*.py"), REPO / "params.yaml", REPO / "dvc.yaml"]:
        cited |= {(path, m) for m in re.findall(r"[\w./-]+\.md\b", path.read_text())}
    missing = [f"{p.relative_to(REPO)}: {m}" for p, m in sorted(cited) if not (REPO / m).exists()]
    assert missing == []
