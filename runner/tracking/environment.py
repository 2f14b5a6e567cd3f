"""What a run needs to be rerun and compared: versions, platform, devices, code and data."""

import hashlib
import inspect
import platform
import subprocess
import sysconfig
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from runner.backends.devices import cpu_cores
from runner.targets import target

# Besides the backend's own packages, which a run of the other backend leaves out: a TensorFlow
# run's environment is the one its golden histories were recorded in.
PACKAGES = ("keras", "mlflow", "hydra-core", "numpy")
_CHECKOUT = Path(__file__).resolve().parents[1]


def describe(data_digests: dict[str, str], backend: Any) -> dict[str, Any]:
    """The environment.json of a run on `backend` (a `runner.backends.Backend`);
    `data_digests` holds the SHA-256 of each data array."""
    return {
        "python": platform.python_version(),
        "backend": backend.name,
        "packages": {name: _version(name) for name in (*PACKAGES, *backend.packages)},
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu(),
        "devices": backend.physical_devices(),
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": git_dirty()},
        "data_sha256": data_digests,
    }


def tags(environment: dict[str, Any]) -> dict[str, str]:
    """The part of the environment one filters runs on, as MLflow tags."""
    backend = environment.get("backend", "tensorflow")
    found = {
        "python_version": environment["python"],
        "keras_version": environment["packages"]["keras"],
        "backend": backend,
        "backend_version": environment["packages"].get(backend),
        "tensorflow_version": environment["packages"].get("tensorflow"),
        "devices": ", ".join(environment["devices"]),
        "git_commit": environment["git"]["commit"],
        "git_dirty": environment["git"]["dirty"],
        "user_git_commit": environment.get("user_code", {}).get("git", {}).get("commit"),
        "user_git_dirty": environment.get("user_code", {}).get("git", {}).get("dirty"),
    }
    return {key: str(value) for key, value in found.items() if value is not None}


# The config nodes whose `_target_` may name a user's code, besides each of `callbacks`.
TARGETS = ("model", "data", "optimizer", "loss")


def user_modules(config: Mapping[str, Any]) -> dict[str, Path]:
    """The modules of the user's own code that the resolved `config`'s targets (model, data,
    optimizer, loss, callbacks) name, each with its file: those outside the runner's package,
    the standard library and installed packages. Call once the targets are built: it imports
    nothing new."""
    nodes = {path: config.get(path) for path in TARGETS}
    nodes.update(
        {f"callbacks.{name}": node for name, node in (config.get("callbacks") or {}).items()}
    )
    found = {}
    for path, node in nodes.items():
        if isinstance(node, Mapping) and node.get("_target_"):
            module = inspect.getmodule(target(node, path))
            file = getattr(module, "__file__", None)
            if module is not None and file and _users(Path(file).resolve()):
                found[module.__name__] = Path(file).resolve()
    return found


def user_code(modules: dict[str, Path]) -> dict[str, Any]:
    """environment.json's `user_code`: each of `modules`' file (relative to its git checkout)
    and SHA-256, and the git commit of that checkout and whether it is dirty (a tracked file
    changed, or a module not committed), as `git` records the runner's own. Modules from
    several checkouts give their commits joined by ", ", dirty if any is."""
    described, commits, dirty = {}, [], []
    for name, file in modules.items():
        root = _git("rev-parse", "--show-toplevel", cwd=file.parent)
        described[name] = {
            "path": str(file.relative_to(root) if root else file),
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        }
        if root is None:
            continue
        commit = _git("rev-parse", "HEAD", cwd=file.parent)
        if commit not in commits:
            commits.append(commit)
        changed = _git("status", "--porcelain", "--untracked-files=no", cwd=file.parent)
        untracked = _git("status", "--porcelain", "--", str(file), cwd=file.parent)
        dirty.append(bool(changed or untracked))
    return {
        "modules": described,
        "git": {
            "commit": ", ".join(c for c in commits if c) or None,
            "dirty": any(dirty) if dirty else None,
        },
    }


def source_folder(name: str, file: Path) -> str:
    """The artifact folder module `name`'s source `file` is logged in, which keeps its import
    path: code/ for `tiny_net` (tiny_net.py), code/mynets/ for a package `mynets`
    (__init__.py) and for `mynets.mlp` (mlp.py)."""
    package = name.split(".") if file.stem == "__init__" else name.split(".")[:-1]
    return "/".join(["code", *package])


def _users(file: Path) -> bool:
    """Whether `file` is the user's code rather than the runner's, Python's or a package's."""
    if file.is_relative_to(_CHECKOUT) or {"site-packages", "dist-packages"} & set(file.parts):
        return False
    paths = sysconfig.get_paths()
    shipped = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return not any(file.is_relative_to(Path(p).resolve()) for p in shipped)


def cpu() -> str:
    """The processor model and the cores this process may use: kernels, and so the last bits of
    a result, can differ between processors."""
    return f"{cpu_model()}, {cpu_cores()} cores"


def cpu_model() -> str:
    """The processor's marketing name where Linux tells it, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_dirty() -> bool | None:
    """Whether the runner's checkout has uncommitted changes; None outside a checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _git(*args: str, cwd: Path = _CHECKOUT) -> str | None:
    """git's answer in `cwd` (the runner's checkout by default); None outside a checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
