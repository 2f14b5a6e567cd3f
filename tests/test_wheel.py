"""The built wheel installs into an environment of one's own: its configs and sweeper inside,
requirements that resolve without this project's uv settings, and a `runner` that works from any
folder. Built and installed offline, from uv's cache and this environment's packages."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .conftest import REPO, only_run, template_store

pytestmark = pytest.mark.xdist_group("test_wheel")


def run(*command: str | Path, cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run("uv", "build", "--wheel", "--offline", "--out-dir", dist)
    [built] = dist.glob("*.whl")
    return built


def test_the_wheel_holds_the_configs_and_needs_no_override(wheel):
    """Every file of conf/ goes in as runner/conf, beside the runner's sweeper. Its requirements
    are those this environment installed, which `uv pip check` finds all satisfied, every
    package's own requirements too: pip resolves them with no override of uv's."""
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"runner/{p.relative_to(REPO).as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert configs and configs <= names
    assert "hydra_plugins/runner_optuna/resumable_sweeper.py" in names
    [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    required = [line[15:] for line in text.splitlines() if line.startswith("Requires-Dist: ")]
    assert not [r for r in required if r.startswith("hydra-optuna-sweeper")]
    assert required == importlib.metadata.requires("keras-hydra-runner"), "run `uv sync`"
    run("uv", "pip", "check", "--offline", "--python", sys.executable)


def test_the_installed_runner_works_from_an_empty_folder(wheel, tmp_path, mnist_dir):
    """Installed without its dependencies into a new environment that sees this one's packages
    but not the checkout, it composes a preset and trains from a folder without conf/."""
    venv = tmp_path / "venv"
    run("uv", "venv", "--offline", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    # A path, not a site directory: the checkout's editable-install .pth there is not read.
    Path(site, "project_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run("uv", "pip", "install", "--offline", "--no-deps", "--python", python, wheel)
    folder = tmp_path / "empty"
    folder.mkdir()
    outer = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    env = {**outer, "MNIST_DIR": str(mnist_dir)}
    where = "import runner, hydra_plugins.runner_optuna as h; print(*runner.__path__, *h.__path__)"
    for path in run(python, "-c", where, cwd=folder, env=env).split():
        assert Path(path).is_relative_to(site), path
    runner = venv / "bin" / "runner"
    printed = run(runner, "--cfg", "job", "experiment=deep_mnist_cnn", cwd=folder, env=env)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert OmegaConf.create(printed) == compose("config", ["experiment=deep_mnist_cnn"])
    shutil.copyfile(template_store(), folder / "mlflow.db")  # a new store, made once a session
    run(runner, "debug=quick", cwd=folder, env=env)
    finished = only_run(folder)
    assert finished.info.status == "FINISHED" and "test/accuracy" in finished.data.metrics
