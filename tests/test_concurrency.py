"""Runs started at the same moment in one folder: each gets its own output folder and MLflow run,
and the store they all create at once comes out whole."""

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from runner.tracking.store import open_store

from .conftest import QUICK, cli, compose_config, mlflow_server, store_client

# QUICK, shorter still: a few seconds of training each, so that the start-up is what overlaps.
SHORT = [
    *QUICK,
    "trainer.steps=10",
    "trainer.eval_every=10",
    "tracking.system_metrics=false",
]


def _open_at_once(uri: str, barrier, errors) -> None:
    """One process's open_store, once every process is ready to make it."""
    barrier.wait()
    try:
        open_store(uri, "mnist")
    except BaseException as error:
        errors.put(f"{type(error).__name__}: {error}")


def open_at_once(uri: str, processes: int = 4) -> list[str]:
    """open_store(uri, "mnist") in `processes` processes at the same moment; their errors."""
    spawn = multiprocessing.get_context("spawn")
    barrier, errors = spawn.Barrier(processes), spawn.Queue()
    started = [
        spawn.Process(target=_open_at_once, args=(uri, barrier, errors)) for _ in range(processes)
    ]
    for process in started:
        process.start()
    for process in started:
        process.join(timeout=300)
    found = [errors.get() for _ in range(errors.qsize())]
    return found + [f"exit code {p.exitcode}" for p in started if p.exitcode != 0]


def test_processes_opening_a_new_store_at_once_all_get_it(tmp_path):
    """The second of two processes opening a new SQLite store used to die creating its tables
    (`table evaluation_datasets already exists`), or the experiment (`UNIQUE constraint`)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert open_at_once(uri) == []
    assert len(MlflowClient(uri).search_experiments(filter_string="name = 'mnist'")) == 1


@pytest.fixture
def server(tmp_path) -> Iterator[str]:
    """`mlflow server` over a new store."""
    with mlflow_server(tmp_path / "server.db") as url:
        yield url


def test_processes_opening_a_new_experiment_on_a_server_at_once_all_get_it(server):
    """All find the experiment missing and create it, and all but the first are told that it
    exists by then. mlflow.set_experiment went on with it; open_store, which now creates the
    experiment itself to choose where its artifacts go, must too (a guard, not a defect)."""
    assert open_at_once(server) == []
    assert len(MlflowClient(server).search_experiments(filter_string="name = 'mnist'")) == 1


def test_runs_started_at_once_each_get_their_own_folder_and_run(tmp_path, mnist_dir):
    """`runner`s started together in an empty folder (3 here, 4 in the report) used to fail
    creating the store, and those started in the same second shared `outputs/<date>/<time>/`:
    one's checkpoints overwrote the other's, and its logged `hydra/overrides.yaml` held the
    other's seed."""
    env = {**os.environ, "MNIST_DIR": str(mnist_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    runner = str(Path(sys.executable).with_name("runner"))
    processes = [
        subprocess.Popen(
            [runner, *SHORT, f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(1, 4)
    ]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 3, "\n".join(e[-2000:] for e in errors)

    folders = [f for f in tmp_path.glob("outputs/*/*") if f.is_dir()]
    assert len(folders) == 3, folders
    client = store_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    seeds_of_runs = {r.info.run_id: r.data.params["seed"] for r in runs}
    assert sorted(seeds_of_runs.values()) == ["1", "2", "3"]
    for folder in folders:
        # One run wrote everything in this folder: Hydra's files, its log, its checkpoint.
        seed = _seed(yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()))
        hydra = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert Path(hydra["runtime"]["output_dir"]) == folder
        logged = [i for i, s in seeds_of_runs.items() if i in (folder / "runner.log").read_text()]
        assert [seeds_of_runs[i] for i in logged] == [seed], folder
        assert [c.name for c in (folder / "checkpoints").iterdir()] == ["step-0000010"]
        overrides = Path(client.download_artifacts(logged[0], "hydra/overrides.yaml"))
        assert _seed(yaml.safe_load(overrides.read_text())) == seed


def _seed(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("seed="))


def test_a_run_never_takes_the_folder_of_a_run_started_in_the_same_second(in_tmp_store):
    """Hydra's `outputs/<date>/<time>` (and `multirun/...` for sweeps) used to be reused when it
    existed: here the folders of runs starting in the next two minutes already do."""
    now = datetime.now()
    for seconds in range(120):
        moment = now + timedelta(seconds=seconds)
        for top in ("outputs", "multirun"):
            (in_tmp_store / top / f"{moment:%Y-%m-%d}" / f"{moment:%H-%M-%S}").mkdir(parents=True)
    cfg = compose_config(hydra=True)
    for key, top in (("run", "outputs"), ("sweep", "multirun")):
        folder = Path(cfg.hydra[key].dir)
        assert folder.parent.parent == Path(top)
        assert folder.name.endswith("_2"), folder
        assert folder.is_dir() and not any(folder.iterdir())
        assert cfg.hydra[key].dir == str(folder), "every reading gives the same folder"
    assert len(list(in_tmp_store.glob("*/*/*"))) == 2 * 120 + 2


def test_printing_the_config_creates_no_folder(tmp_path, mnist_dir):
    result = cli("runner", "--cfg", "job", cwd=tmp_path, mnist_dir=mnist_dir, new_store=False)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []
