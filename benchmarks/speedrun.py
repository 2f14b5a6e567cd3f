"""Time `experiment=speedrun` as a user runs it, seeds 1, 2 and 3, beside the host's matmul speed.

    MNIST_DIR=/path/to/mnist uv run python benchmarks/speedrun.py
    MNIST_DIR=/path/to/mnist uv run python benchmarks/speedrun.py --seeds 1 2 3 4 5

Each seed runs `runner experiment=speedrun seed=S`, the script uv installed, as a whole command
in a scratch folder of its own (so it makes its own MLflow store, as a first run does); its wall
time is the command's, start-up and test evaluation included, and its test accuracy is read back
from that store. The host's speed, a 4096x4096 float32 matmul in TensorFlow (median of 5 after a
warm-up, in a process of its own), is measured before and after the runs; hosts and their loads
differ several-fold, so each wall time is also given scaled to a 464 GFLOP/s host, issue 27's
reference: wall * GFLOP/s / 464, with the mean of the two matmul figures. The goal is a median
scaled time of at most 30 s with every seed at test accuracy >= 0.992.

    uv run python benchmarks/speedrun.py --study FOLDER

prints instead the trials of the Optuna search of benchmarks/hparams_search/speedrun.yaml that
ran in FOLDER, from the MLflow store there: each trial's searched values, its validation
accuracy (what the search maximised), test accuracy and training throughput, best first.
"""

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import yaml
from mlflow import MlflowClient
from startup_commands import matmul_gflops

from runner.tracking.environment import cpu_cores, cpu_model

# Issue 27's reference host: its matmul speed, the goal's scaled seconds and test accuracy.
REFERENCE_GFLOPS = 464.0
GOAL_S = 30.0
GOAL_ACCURACY = 0.992
SEARCH = Path(__file__).resolve().parent / "hparams_search" / "speedrun.yaml"


def run(seed: int, overrides: list[str]) -> tuple[float, float]:
    """Wall seconds and test accuracy of one `runner experiment=speedrun seed=SEED` command."""
    runner = Path(sys.executable).parent / "runner"
    argv = [str(runner), "experiment=speedrun", f"seed={seed}", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    with tempfile.TemporaryDirectory(prefix="speedrun-") as scratch:
        start = time.perf_counter()
        result = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            sys.exit(f"seed {seed} exited {result.returncode}:\n{result.stderr[-3000:]}")
        client = MlflowClient(f"sqlite:///{scratch}/mlflow.db")
        experiments = [e.experiment_id for e in client.search_experiments()]
        (found,) = client.search_runs(experiments)
    return wall, found.data.metrics["test/accuracy"]


def trials(folder: Path) -> Iterator[str]:
    """The lines of a table of the search trials recorded in `folder`'s MLflow store."""
    keys = list(yaml.safe_load(SEARCH.read_text())["hydra"]["sweeper"]["params"])
    client = MlflowClient(f"sqlite:///{folder.resolve()}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'FINISHED'")
    runs = [r for r in runs if "optuna.trial" in r.data.tags]
    runs.sort(key=lambda r: -r.data.metrics.get("val/accuracy", 0.0))
    header = ["trial", *keys, "val accuracy", "test accuracy", "examples/s", "run s"]
    yield "| " + " | ".join(header) + " |"
    yield "|" + "---|" * len(header)
    for run in runs:
        values = [run.data.params[key] for key in keys]
        shown = [f"{float(v):.3g}" if v.replace(".", "").isdigit() else v for v in values]
        metrics = run.data.metrics
        seconds = (run.info.end_time - run.info.start_time) / 1000
        cells = [run.data.tags["optuna.trial"], *shown]
        cells += [f"{metrics.get(m, float('nan')):.4f}" for m in ("val/accuracy", "test/accuracy")]
        cells += [f"{metrics.get('perf/examples_per_sec', float('nan')):.0f}", f"{seconds:.0f}"]
        yield "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("overrides", nargs="*", help="more overrides for each run (key=value)")
    parser.add_argument("--study", type=Path, metavar="FOLDER", help="print a search's trials")
    args = parser.parse_args()
    if args.study:
        print("\n".join(trials(args.study)))
        print(f"\nmade by: uv run python benchmarks/speedrun.py {shlex.join(sys.argv[1:])}")
        return
    if not os.environ.get("MNIST_DIR"):
        sys.exit("MNIST_DIR is unset: set it to the folder of the MNIST IDX files")
    load_before = os.getloadavg()
    before = matmul_gflops()
    results = {seed: run(seed, args.overrides) for seed in args.seeds}
    after = matmul_gflops()
    load_after = os.getloadavg()
    gflops = (before + after) / 2

    print(
        f"{date.today()}, CPU: {cpu_cores()} cores, {cpu_model()}; 4096x4096 float32 matmul in "
        f"TensorFlow: {before:.0f} GFLOP/s before the runs, {after:.0f} after, mean "
        f"{gflops:.0f}; load averages (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.2f}' for x in load_after)}\n"
    )
    print(f"| seed | test accuracy | wall s | scaled s (wall * {gflops:.0f} / 464) |")
    print("|---|---|---|---|")
    for seed, (wall, accuracy) in results.items():
        print(f"| {seed} | {accuracy:.4f} | {wall:.1f} | {wall * gflops / REFERENCE_GFLOPS:.1f} |")
    wall = statistics.median(w for w, _ in results.values())
    scaled = wall * gflops / REFERENCE_GFLOPS
    lowest = min(a for _, a in results.values())
    print(f"| median | min {lowest:.4f} | {wall:.1f} | {scaled:.1f} |\n")
    met = scaled <= GOAL_S and lowest >= GOAL_ACCURACY
    print(
        f"goal (every seed >= {GOAL_ACCURACY}, median scaled <= {GOAL_S:.0f} s): "
        f"{'met' if met else 'NOT met'}"
    )
    command = shlex.join(sys.argv[1:])
    print(f"\nmade by: uv run python benchmarks/speedrun.py {command}".rstrip())


if __name__ == "__main__":
    main()
