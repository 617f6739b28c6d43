"""The package's shape: imports flow one way (no circles, lazy imports included), click only at the
CLI edge, the formatter never switched off, and every document the code cites is in the repository.
"""

from __future__ import annotations

import ast
import re

from tests.import_graph import PACKAGE, REPO, package_imports

# The layers, lowest first: a module imports only from its own layer and those below. The package's
# own __init__ (the public API, loaded lazily) stands above them all.
LAYERS = [
    "qks_pipeline",  # the root modules: errors, config, devices, atomic writes
    "qks_pipeline.data",
    "qks_pipeline.store",
    "qks_pipeline.stage_one",
    "qks_pipeline.stage_two",
    "qks_pipeline.predict",
    "qks_pipeline.index",
    "qks_pipeline.cli",
]


def layer(module: str) -> int:
    """The index in LAYERS of the deepest layer that holds `module`."""
    return max(
        i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")
    )


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    imports = package_imports()
    # importing a package runs its __init__, but `from pkg import sub` does not make pkg depend on
    # its children
    graph = {
        name: {m for m in found.every if not name.startswith(m + ".")}
        for name, found in imports.items()
    }
    return graph, {name: found.external for name, found in imports.items()}


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


def test_imports_flow_down_the_layers():
    graph, _ = _graph()
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if module != "qks_pipeline"
        for target in sorted(targets)
        if target != "qks_pipeline" and layer(target) > layer(module)
    ]
    assert upward == []


def test_the_root_holds_at_most_twelve_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 12, root


def test_only_the_cli_imports_click():
    _, external = _graph()
    outside = sorted(
        m
        for m, names in external.items()
        if "click" in names and not m.startswith("qks_pipeline.cli")
    )
    assert outside == []


def test_the_formatter_is_never_switched_off():
    """No Python file of the repository (outside hidden folders such as .venv) turns ruff format
    off, for a line (fmt: skip) or a block (fmt: off)."""
    switch = re.compile(r"#\s*fmt:\s*(skip|off)\b")
    files = [
        p
        for p in REPO.rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
    ]
    skipped = [str(p.relative_to(REPO)) for p in files if switch.search(p.read_text())]
    assert skipped == []


def test_every_cited_document_is_in_the_repository():
    cited = set()
    for path in [*PACKAGE.rglob("*.py"), REPO / "params.yaml", REPO / "dvc.yaml"]:
        cited |= {(path, m) for m in re.findall(r"[\w./-]+\.md\b", path.read_text())}
    missing = [f"{p.relative_to(REPO)}: {m}" for p, m in sorted(cited) if not (REPO / m).exists()]
    assert missing == []


def test_no_two_public_names_clash():
    """A public function or class is defined once in the package, so a name says which one it is."""
    defined: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            is_definition = isinstance(node, (ast.FunctionDef, ast.ClassDef))
            if is_definition and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    clashes = {name: paths for name, paths in defined.items() if len(paths) > 1}
    assert clashes == {}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_distribution_is_declared():
    """What the package imports directly is in pyproject.toml (dependencies or an extra), not only
    present because another package brought it."""
    import sys
    from importlib.metadata import packages_distributions

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    declared = {_normalised(re.split(r"[<>=!\[;\s]", r)[0]) for r in requirements}
    _, external = _graph()
    imported = set().union(*external.values()) - set(sys.stdlib_module_names)
    distributions = packages_distributions()
    undeclared = sorted(
        f"{name} ({', '.join(distributions.get(name, ['not installed']))})"
        for name in imported
        if not declared & {_normalised(d) for d in distributions.get(name, [name])}
    )
    assert undeclared == []
