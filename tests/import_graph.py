"""The package's import graph, read with ast: what each module imports at its top level and inside
its functions. The structure tests and the DVC dependency test share it."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qks_pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass
class Imports:
    """The imports of one module: package modules at the top level and inside functions (by
    function name), and the top-level names of third-party imports anywhere."""

    top: set[str] = field(default_factory=set)
    in_function: dict[str, set[str]] = field(default_factory=dict)
    external: set[str] = field(default_factory=set)

    @property
    def every(self) -> set[str]:
        return self.top.union(*self.in_function.values())


def _imported_names(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """Every dotted name an import statement may load (`from a import b` may load a or a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def read_imports(path: Path, modules: set[str]) -> Imports:
    """The imports of the module at `path`; `modules` are the package's module names."""
    own_name = module_name(path)
    package = own_name if path.name == "__init__.py" else own_name.rpartition(".")[0]
    found = Imports()
    tree = ast.parse(path.read_text(), str(path))
    scopes: list[tuple[str | None, ast.AST]] = [(None, tree)]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scopes.append((node.name, node))
    for scope, root in scopes:
        nodes = ast.walk(root) if scope else _top_level(tree)
        for node in nodes:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(node, package):
                if name.split(".")[0] != "qks_pipeline":
                    found.external.add(name.split(".")[0])
                    continue
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != own_name:
                    target = (
                        found.top if scope is None else found.in_function.setdefault(scope, set())
                    )
                    target.add(name)
    return found


def _top_level(tree: ast.Module):
    """The statements that run when the module is imported (functions' and classes' bodies left out,
    `if` and `try` blocks included, `if TYPE_CHECKING:` blocks not)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            continue
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    stack.append(child)
            for handler in getattr(node, "handlers", []):
                stack.extend(handler.body)


def package_files() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def package_imports() -> dict[str, Imports]:
    files = package_files()
    return {name: read_imports(path, set(files)) for name, path in files.items()}


def parents(module: str) -> list[str]:
    """The packages whose `__init__` runs before `module` does."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(start: set[str], imports: dict[str, Imports], top_only: set[str]) -> set[str]:
    """Every module that importing `start` may load: a module's parents, its top-level imports and,
    unless it is in `top_only`, the imports inside its functions too."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        found = imports[module]
        todo += parents(module)
        todo += found.top if module in top_only else found.every
    return seen
