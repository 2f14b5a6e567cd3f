"""The package's dependencies point one way: no module imports, even inside a function, a
module that imports it back."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports() -> dict[str, set[str]]:
    """Each runner module and the runner modules it imports anywhere in its code."""
    found = {}
    for path in (REPO / "runner").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("runner"):
                # `from runner.backends import jax` imports the module runner.backends.jax.
                deps |= {_module_or_package(node.module, alias.name) for alias in node.names}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name.startswith("runner")}
        found[name] = deps
    return found


def _module_or_package(package: str, name: str) -> str:
    """`package.name` where that is a module of the repository, else `package`."""
    path = REPO.joinpath(*package.split("."), name)
    return f"{package}.{name}" if path.with_suffix(".py").exists() or path.is_dir() else package


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import path that comes back to where it started."""
    found = []

    def walk(path: list[str]) -> None:
        for dep in sorted(graph.get(path[-1], ())):
            if dep == path[0]:
                found.append([*path, dep])
            elif dep in graph and dep not in path and dep > path[0]:
                walk([*path, dep])

    for module in sorted(graph):
        walk([module])
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_runner_has_no_import_cycle():
    assert cycles(imports()) == []


def test_the_backend_is_handed_down_not_looked_up():
    """A run's backend is the one `backends.select` returned, passed to what computes with it:
    no module outside `runner/backends/` asks Keras which backend it runs on."""
    lookups = [
        str(path.relative_to(REPO))
        for path in (REPO / "runner").rglob("*.py")
        if "backends" not in path.relative_to(REPO).parts
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr == "current"
        and isinstance(node.value, ast.Name)
        and node.value.id == "backends"
    ]
    assert lookups == []
