"""Shared fixtures: the real MNIST folder, composed configs, and a scratch MLflow store."""

import atexit
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import DictConfig

from runner.cli.train import compose

REPO = Path(__file__).resolve().parents[1]

# Services started once per test session, for every module that asks for them by name: a team
# tracking server on PostgreSQL (`team_server`) and a one-node SLURM cluster (`slurm_cluster`).
pytest_plugins = ["tests.team_server", "tests.slurm_cluster"]


def mnist_path() -> Path:
    """MNIST_DIR; else data/mnist, where `uv run runner` downloads it; else CI's ../shared copy."""
    if "MNIST_DIR" in os.environ:
        return Path(os.environ["MNIST_DIR"]).resolve()
    downloaded = REPO / "data" / "mnist"
    return downloaded if downloaded.is_dir() else REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = mnist_path()
    if (
        not (path / "train-images-idx3-ubyte.gz").is_file()
        and not (path / "train-images-idx3-ubyte").is_file()
    ):
        pytest.fail(
            f"MNIST IDX files not found in {path}: set MNIST_DIR to the folder holding them"
        )
    return path


def compose_config(overrides: list[str] = (), hydra: bool = False) -> DictConfig:
    """The config `runner OVERRIDES` would run with, composed without running it; with `hydra`,
    Hydra's own settings (launcher, sweeper, callbacks) too."""
    return compose(overrides, with_hydra=hydra)


@functools.cache
def template_store() -> Path:
    """A new embedded store's database, made once a process: MLflow makes one through some
    fifty schema migrations, a second of CPU that each test (or `runner` started in an empty
    folder) would otherwise spend again. Its Default experiment keeps artifacts where pytest
    started; the runs of a test go to their own."""
    folder = tempfile.mkdtemp(prefix="new_store")
    atexit.register(shutil.rmtree, folder, True)
    database = Path(folder) / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()
    return database


@pytest.fixture(scope="session")
def new_store() -> Path:
    return template_store()


@pytest.fixture
def in_tmp_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_dir: Path, new_store: Path
) -> Path:
    """Work in an empty directory but for a new MLflow store (mlflow.db, as a run's would be;
    its runs' mlruns/ land beside it), which MLflow records into until a run says otherwise:
    not the store of a test this process ran before."""
    shutil.copyfile(new_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


# tests.probes, which some runs name by _target_, is importable from the repository.
PROBE = {"PYTHONPATH": str(REPO)}


# A run of seconds (conf/debug/quick.yaml): few steps on the first examples of each split,
# nothing printed or saved beyond the metrics. Keys given after it still apply.
QUICK = ["debug=quick"]


def cli(
    name: str,
    *args: str,
    cwd: Path,
    mnist_dir: Path | None = None,
    timeout: int = 300,
    env: dict[str, str] | None = None,
    new_store: bool = True,
    report_tensorflow: bool = False,
    within: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """One of the project's commands (`runner`, `runner-eval`, ...) run as a user would, in
    `cwd`, reading MNIST from `mnist_dir` (a command that reads no data needs none), recording
    into the default store there, unless `env` (variables set over the test's own) names a
    tracking server. A `runner` about to make that store finds a copy of a new one instead (the
    same tables, a second of CPU less), unless `new_store` is False: for tests that check that
    no store is made. With `report_tensorflow`, the command's last line of output says which of
    TensorFlow, JAX and scikit-learn were imported (`imported`). `within` is a command that runs
    it (`unshare ... sh -c ...`)."""
    outer = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env = {**outer, **(env or {}), **({"MNIST_DIR": str(mnist_dir)} if mnist_dir else {})}
    default_store = cwd / "mlflow.db"
    if (
        new_store
        and name == "runner"
        and "MLFLOW_TRACKING_URI" not in env
        and not any(a.startswith("tracking.uri=") for a in args)
        and not default_store.exists()
    ):
        # Whole or absent, for a test that reads it while the command runs.
        partial = default_store.with_suffix(".db.partial")
        shutil.copyfile(template_store(), partial)
        partial.replace(default_store)
    command = [str(Path(sys.executable).with_name(name))]
    if report_tensorflow:
        command = [sys.executable, "-c", _REPORT_TENSORFLOW.format(name=name, main=ENTRIES[name])]
    return subprocess.run(
        [*within, *command, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Each command's `main`, as pyproject.toml's [project.scripts] names it.
ENTRIES = {
    "runner": "runner.cli.train",
    "runner-eval": "runner.cli.evaluate",
    "runner-predict": "runner.cli.predict",
    "runner-repro": "runner.cli.repro",
    "runner-compare": "runner.cli.compare",
}
_REPORT_TENSORFLOW = (
    "import atexit, sys\n"
    "watched = {{'tensorflow', 'jax', 'sklearn'}}\n"
    "atexit.register(lambda: print('imported:', *sorted(watched & set(sys.modules))))\n"
    "sys.argv[0] = {name!r}\n"
    "from {main} import main\n"
    "main()\n"
)


def imported(result: subprocess.CompletedProcess) -> set[str]:
    """Which of TensorFlow, JAX and scikit-learn (which the backends skip, as Keras wants it
    only for its estimator wrappers) a command run with `cli(..., report_tensorflow=True)`
    imported, as it said on its last line."""
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("imported:"), result.stdout[-2000:]
    return set(last.split()[1:])


def readme_commands(section: str) -> list[str]:
    """The commands of the bash blocks under the README heading `section`, in order: a line each
    (lines ending in a backslash joined), comments and blank lines dropped, a heredoc whole with
    its body."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        lines = iter(re.sub(r"\\\n\s*", "", block).splitlines())
        for line in lines:
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:
                body_lines = []
                for inner in lines:
                    body_lines.append(inner)
                    if inner == heredoc.group(1):
                        break
                commands.append("\n".join([line, *body_lines]))
                continue
            command = re.sub(r"\s+#.*", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def store_client(folder: Path) -> MlflowClient:
    """A client of the embedded store a run in `folder` wrote (folder/mlflow.db)."""
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def only_run(folder: Path, experiment: str = "mnist") -> Run:
    """The one run in `folder`'s store, failing if there are more or none."""
    client = store_client(folder)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def parents_and_children(folder: Path) -> tuple[list[Run], list[Run]]:
    """The sweep parent runs in `folder`'s store, and their children: every run there."""
    client = store_client(folder)
    runs = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    parents = [r for r in runs if "sweep.dir" in r.data.tags]
    ids = {p.info.run_id for p in parents}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids]
    assert len(parents) + len(children) == len(runs)
    return parents, children


@contextmanager
def mlflow_server(store: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port over the SQLite store `store`, run in its folder;
    yields its URL once it answers, and stops it (with its workers) afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",  # one is plenty for a test, and starts in half the time of four
            "1",
        ],
        cwd=store.parent,
        # As the README starts it: without the job workers of MLflow's GenAI features, which
        # would outlive it.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its workers share the process group, stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: {server.stderr.read()[-2000:]}"
                    ) from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
