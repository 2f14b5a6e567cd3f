"""What a run needs to be rerun and compared: versions, platform, devices, code and data."""

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Besides the backend's own packages, which a run of the other backend leaves out: a TensorFlow
# run's environment is the one its golden histories were recorded in.
PACKAGES = ("keras", "mlflow", "hydra-core", "numpy")
_CHECKOUT = Path(__file__).resolve().parent


def describe(data_digests: dict[str, str], backend: Any) -> dict[str, Any]:
    """The environment.json of a run on `backend` (a `runner.backends` module);
    `data_digests` holds the SHA-256 of each data array."""
    return {
        "python": platform.python_version(),
        "backend": backend.__name__.rpartition(".")[2],
        "packages": {name: _version(name) for name in (*PACKAGES, *backend.PACKAGES)},
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
    }
    return {key: str(value) for key, value in found.items() if value is not None}


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


def cpu_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, as Linux does)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def git_dirty() -> bool | None:
    """Whether the runner's checkout has uncommitted changes; None outside a checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=_CHECKOUT, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
