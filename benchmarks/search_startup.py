"""Start-up paid once a worker: short trials run by one search process, against the same
trainings each started as a command of its own.

    uv run python benchmarks/search_startup.py               # 6 trials, 3 repeats
    uv run python benchmarks/search_startup.py --trials 10 --repeats 5

A search of `--trials` trials of `debug=quick` (the basic launcher, which runs every trial in
the search's own process) is timed whole, and so are as many `runner debug=quick` commands run
one after the other, each a new process that imports the frameworks, opens the store and reads
the data again. Both train the same learning rates, in scratch folders of their own, one after
the other in each repeat. The table gives the medians over repeats of the seconds a trial costs
either way, and, inside the search, of its first trial (which imports TensorFlow) and of the
others, from the study's own start and end times.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from startup_commands import host_line, matmul_gflops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.sweeps.pruning import open_storage  # noqa: E402

RUNNER = str(Path(sys.executable).parent / "runner")


def rates(trials: int) -> list[float]:
    return [round(0.1 + 0.4 * i / max(trials - 1, 1), 4) for i in range(trials)]


def run(args: list[str], cwd: Path) -> float:
    """Seconds `runner ARGS` takes in `cwd`, whole."""
    start = time.perf_counter()
    done = subprocess.run([RUNNER, *args], cwd=cwd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"runner {' '.join(args)} failed in {cwd}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def search(trials: int, cwd: Path) -> tuple[float, float, float]:
    """The whole search's seconds, its first trial's and the median of the others'."""
    grid = ",".join(str(lr) for lr in rates(trials))
    wall = run(
        [
            "-m",
            "debug=quick",
            f"tracking.uri=sqlite:///{cwd}/mlflow.db",
            "hydra/sweeper=runner_optuna",
            "hydra/sweeper/sampler=grid",
            "hydra.sweeper.storage=journal:optuna.journal",
            "hydra.sweeper.study_name=startup",
            f"hydra.sweeper.n_trials={trials}",
            "hydra.sweeper.n_jobs=1",
            f"optimizer.lr=choice({grid})",
        ],
        cwd,
    )
    storage = open_storage(f"journal:{cwd / 'optuna.journal'}")
    study = optuna.load_study(study_name="startup", storage=storage)
    ordered = sorted(study.trials, key=lambda t: t.datetime_start)
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in ordered]
    return wall, seconds[0], statistics.median(seconds[1:])


def commands(trials: int, cwd: Path) -> float:
    """Seconds of `trials` commands, one after the other."""
    store = f"tracking.uri=sqlite:///{cwd}/mlflow.db"
    return sum(run(["debug=quick", store, f"optimizer.lr={lr}"], cwd) for lr in rates(trials))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    n = options.trials
    rows: dict[str, list[float]] = {"search": [], "commands": [], "first": [], "others": []}
    gflops, load_before = matmul_gflops(), os.getloadavg()
    for repeat in range(options.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            a, b = Path(scratch, "search"), Path(scratch, "commands")
            a.mkdir(), b.mkdir()
            wall, first, others = search(n, a)
            rows["search"].append(wall / n)
            rows["first"].append(first)
            rows["others"].append(others)
            rows["commands"].append(commands(n, b) / n)
        print(f"repeat {repeat + 1}/{options.repeats} done", file=sys.stderr)
    median = {key: statistics.median(values) for key, values in rows.items()}
    print(host_line(gflops, load_before, os.getloadavg()))
    print(f"`uv run python benchmarks/search_startup.py --trials {n} --repeats {options.repeats}`")
    print()
    print("| how the trials start | seconds a trial (median of repeats) |")
    print("|---|---|")
    print(f"| {n} commands, one after the other | {median['commands']:.2f} |")
    print(f"| one search of {n} trials, whole | {median['search']:.2f} |")
    print(f"| - its first trial (imports TensorFlow) | {median['first']:.2f} |")
    print(f"| - each later trial | {median['others']:.2f} |")
    print()
    print(f"commands / search: {median['commands'] / median['search']:.2f}x")


if __name__ == "__main__":
    main()
