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


# The layers, lowest first: a module may import its own layer's modules and those below.
LAYERS = (
    ("runner.errors", "runner.masking", "runner.targets"),
    ("runner.data", "runner.models", "runner.fused_adam"),
    ("runner.backends",),
    ("runner.callbacks", "runner.config"),
    ("runner.tracking",),
    ("runner.training",),
    ("runner.sweeps",),
    ("runner.cli", "runner.__main__"),
)


def layer(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if any(module == name or module.startswith(f"{name}.") for name in names):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_imports_point_down_the_layers():
    """Nothing imports the command line; training imports neither sweeps nor the command line;
    tracking knows nothing of training; and so on down."""
    upward = [
        f"{module} -> {dep}"
        for module, deps in imports().items()
        if module != "runner"
        for dep in deps
        if dep != "runner" and layer(dep) > layer(module)
    ]
    assert upward == []


def _runner_modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text())) for path in sorted((REPO / "runner").rglob("*.py"))]


def _functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_training_does_not_reach_for_hydra():
    """Training gets its settings from the composition root, not from Hydra's runtime."""
    reaching = [
        str(path.relative_to(REPO))
        for path, tree in _runner_modules()
        if "training" in path.relative_to(REPO).parts
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(
            name.split(".")[0] == "hydra"
            for name in [getattr(node, "module", None) or "", *(a.name for a in node.names)]
        )
    ]
    assert reaching == []


def test_the_folders_show_the_layers():
    assert len(list((REPO / "runner").glob("*.py"))) <= 8


def test_modules_and_functions_stay_short():
    long_modules = [
        f"{path.relative_to(REPO)}: {len(path.read_text().splitlines())}"
        for path, _ in _runner_modules()
        if len(path.read_text().splitlines()) > 400
    ]
    long_functions = [
        f"{path.relative_to(REPO)}:{node.name}: {node.end_lineno - node.lineno + 1}"
        for path, tree in _runner_modules()
        for node in _functions(tree)
        if node.end_lineno - node.lineno + 1 > 60
    ]
    assert (long_modules, long_functions) == ([], [])


def test_many_parameters_are_given_by_keyword():
    """Five parameters or more are keyword-only: a call says which value is which."""
    positional = [
        f"{path.relative_to(REPO)}:{node.name}"
        for path, tree in _runner_modules()
        for node in _functions(tree)
        for names in [[a.arg for a in node.args.posonlyargs + node.args.args]]
        if len([n for n in names if n not in ("self", "cls")]) >= 5
    ]
    assert positional == []


def test_imports_sit_at_the_top():
    """Only where Keras must wait for the backend, or an optional heavy dependency waits for
    the command that needs it, does an import sit inside a function."""
    local = {
        (path, node.lineno)
        for path, tree in _runner_modules()
        for function in _functions(tree)
        for node in ast.walk(function)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }
    assert len(local) <= 50


def test_the_whole_config_stops_at_the_composition_root():
    """Below the command line and the composition root, each layer gets its own settings."""
    taking_config = [
        f"{path.relative_to(REPO)}:{node.name}"
        for path, tree in _runner_modules()
        for node in _functions(tree)
        for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        if arg.arg == "cfg" or "DictConfig" in ast.unparse(arg.annotation or ast.Constant(""))
    ]
    assert len(taking_config) <= 8, taking_config
    hydra_lookups = [
        str(path.relative_to(REPO))
        for path, _ in _runner_modules()
        if "HydraConfig" in path.read_text()
    ]
    assert len(hydra_lookups) <= 2, hydra_lookups
