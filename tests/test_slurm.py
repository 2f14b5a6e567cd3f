"""Sweeps on a real one-node SLURM cluster (tests/slurm_cluster.py), through `hydra/launcher=slurm`
and submitit's sbatch: the runs it records, the job script it writes, what a cluster without
accounting prints, jobs that sbatch refuses, a job cancelled while it trains, and an Optuna
search whose slots do not wait for each other's jobs."""

import re
import shlex
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest

from runner.sweeps import pruning

from .conftest import QUICK, cli, parents_and_children, readme_commands
from .slurm_cluster import SlurmCluster
from .team_server import SECTION
from .test_optuna import sweep_of_unequal_trials

# One worker runs every SLURM test: they share one cluster, and the sweep below.
pytestmark = pytest.mark.xdist_group("slurm")


def on_cpus(cluster: SlurmCluster) -> list[str]:
    """The `slurm` preset on the cluster's partition without GPUs, one core and 2 GB a job."""
    return [
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={cluster.partition}",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10",
    ]


@pytest.fixture(scope="module")
def sweep(slurm_cluster, tmp_path_factory, mnist_dir):
    """A sweep of 2 jobs on the cluster, the README's ("For a team") on this cluster's partition
    without GPUs: (its folder, the command's result)."""
    work = tmp_path_factory.mktemp("slurm_sweep")
    [line] = [c for c in readme_commands(SECTION) if "hydra/launcher=slurm" in c]
    readme = shlex.split(line)[3:]  # after `uv run runner`
    assert readme[:2] == ["-m", "hydra/launcher=slurm"] and "seed=1,2" in readme, line
    chosen = [a for a in readme if not a.startswith("hydra.launcher.partition=")]
    args = [*chosen, *on_cpus(slurm_cluster)[1:], *QUICK]
    env = {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    result = cli("runner", *args, cwd=work, mnist_dir=mnist_dir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_sweep_runs_its_jobs_with_sbatch_as_children_of_one_parent(sweep, slurm_cluster):
    work, _ = sweep
    [parent], children = parents_and_children(work)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.launcher"] == "SlurmLauncher"
    assert sorted(c.data.params["seed"] for c in children) == ["1", "2"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"train/loss", "val/accuracy", "test/accuracy"} <= child.data.metrics.keys()
    # Both were one job array of SLURM's, which ran them to completion.
    logs = sorted(Path(parent.data.tags["sweep.dir"]).glob(".submitit/*_[01]/*_log.out"))
    assert len(logs) == 2
    [array] = {path.parent.name.split("_")[0] for path in logs}
    assert slurm_cluster.final_states(array) == [
        f"{array}_{n} COMPLETED {slurm_cluster.partition}" for n in (0, 1)
    ]


def test_no_gpu_asked_for_with_gpus_per_node_0(sweep):
    """The preset's GPU a job, turned off: no GPU request of any count in the job script
    (submitit alone would write --gpus-per-node=0)."""
    work, _ = sweep
    [script] = work.glob("multirun/*/*/.submitit/*/*_submission.sh")
    text = script.read_text()
    assert "#SBATCH --partition=cpu" in text and "#SBATCH --mem=2GB" in text
    assert not re.search("gpu|gres", text, re.IGNORECASE), text


def test_a_cluster_without_accounting_says_so_once(sweep):
    _, result = sweep
    output = result.stdout + result.stderr
    assert output.count("Bypassing sacct error") == 0
    assert "accounting storage is disabled" not in output  # sacct's own complaint
    assert output.count("SLURM accounting is off on this cluster, so sacct cannot tell") == 1


def test_slurm_slots_start_a_trial_while_a_longer_one_runs(slurm_cluster, tmp_path, mnist_dir):
    """No barrier on SLURM: two slots, each trial its own sbatch job, and a slot whose job ends
    submits the next trial while the other's longer job still runs. Each trial starts a
    process of its own, as a job of its own."""
    env = {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    study = sweep_of_unequal_trials(tmp_path, mnist_dir, on_cpus(slurm_cluster), env=env)
    assert len({t.user_attrs[pruning.ATTEMPT_ATTR]["worker"] for t in study.trials}) == 3


def test_a_job_the_cluster_cannot_run_is_refused_in_one_line(slurm_cluster, tmp_path, mnist_dir):
    """The preset's one GPU a job, on a cluster without any: sbatch refuses the jobs, and the
    command says so in one line that says what to change."""
    args = ["-m", "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_cluster.partition}"]
    env = {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    result = cli("runner", *args, "seed=1,2", *QUICK, cwd=tmp_path, mnist_dir=mnist_dir, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "runner: error:" in line]
    assert line == (
        "runner: error: sbatch refused the sweep's jobs: Invalid generic resource (gres) "
        "specification; set hydra.launcher.partition, gpus_per_node, cpus_per_task and mem_gb "
        "to what the cluster has (sinfo -o '%P %c %m %G' lists them)"
    )
    [parent], children = parents_and_children(tmp_path)
    assert parent.info.status == "FAILED" and children == []


def test_a_cancelled_job_fails_the_sweep_in_one_line(slurm_cluster, tmp_path, mnist_dir):
    """scancel while job #1 trains: its run ends KILLED, job #0 still finishes, the parent
    run ends FAILED, and the command names the job in one line, without a traceback."""
    args = ["-m", *on_cpus(slurm_cluster), "trainer.steps=30,30000", *QUICK]
    env = {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    with ThreadPoolExecutor(1) as pool:
        sweep = pool.submit(cli, "runner", *args, cwd=tmp_path, mnist_dir=mnist_dir, env=env)
        running = wait_for_run(tmp_path, "30000", sweep)
        [folder] = tmp_path.glob("multirun/*/*/.submitit/*_1")
        job_id = folder.name
        slurm_cluster.run("scancel", job_id)
        result = sweep.result(timeout=240)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "runner: error:" in line]
    assert line == (
        f"runner: error: SLURM job {job_id} (#1 trainer.steps=30000) ended CANCELLED without "
        f"its result; its log: {folder / f'{job_id}_0_log.err'}"
    )
    [parent], children = parents_and_children(tmp_path)
    assert parent.info.status == "FAILED"
    status = {c.data.params["trainer.steps"]: c.info.status for c in children}
    assert status == {"30": "FINISHED", "30000": "KILLED"}, job_logs(folder.parent)
    assert running in {c.info.run_id for c in children}


def wait_for_run(folder: Path, steps: str, sweep: Future) -> str:
    """The id of the run with `trainer.steps=STEPS` in `folder`'s store, once it is RUNNING
    (SIGTERM then stops it with a checkpoint). Read with sqlite3, read-only: an MLflow client
    could migrate the store's tables while the sweep creates them."""
    query = """
        SELECT runs.run_uuid FROM runs JOIN params ON params.run_uuid = runs.run_uuid
        WHERE params.key = 'trainer.steps' AND params.value = ? AND runs.status = 'RUNNING'"""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not sweep.done():
        try:
            with closing(sqlite3.connect(f"file:{folder / 'mlflow.db'}?mode=ro", uri=True)) as db:
                found = db.execute(query, (steps,)).fetchall()
        except sqlite3.OperationalError:  # no store yet, or its tables not yet made
            found = []
        if found:
            return found[0][0]
        time.sleep(0.5)
    result = sweep.result() if sweep.done() else None
    pytest.fail(f"no run with trainer.steps={steps} started: {result and result.stderr[-3000:]}")


def job_logs(submitit: Path) -> str:
    """The end of each job's log in a sweep's `.submitit` folder, to tell why a job failed."""
    return "\n".join(
        f"{log}:\n{log.read_text()[-2000:]}" for log in sorted(submitit.glob("*/*_log.*"))
    )
