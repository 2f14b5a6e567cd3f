"""Run each seed tutorial's preset (and fast_cnn) in full; write the results to docs/results.md.

    uv run python benchmarks/reproduce_seeds.py                       # every preset
    uv run python benchmarks/reproduce_seeds.py deep_mnist_softmax    # only some; other rows stay
    uv run python benchmarks/reproduce_seeds.py layers_cnn --seeds 1,2,3  # spread over seeds

Each preset runs as `runner experiment=NAME` in its own subprocess and scratch folder (MLflow
store included); its test accuracy is read back from that store, its wall time is the whole
command's, start-up included. Rows for presets not run this time are kept from the old table.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from mlflow import MlflowClient

from runner.backends.devices import cpu_cores
from runner.tracking.environment import cpu_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results.md"
TUTORIAL = {
    "deep_mnist_softmax": "about 92% (Deep MNIST for Experts)",
    "deep_mnist_cnn": "about 99.2% (Deep MNIST for Experts)",
    "layers_cnn": "97.3% (A Guide to TF Layers)",
    "deep_mnist_r": "0.9173 (Deep MNIST for Experts, R edition)",
    "fast_cnn": "none: the raw-ops CNN on a short schedule (issue 4's goal: 5 min)",
}
TARGET = {
    "deep_mnist_softmax": 0.915,
    "deep_mnist_cnn": 0.991,
    "layers_cnn": 0.970,
    "deep_mnist_r": 0.915,
    "fast_cnn": 0.992,
}
NOTES = "## Notes"
HEADER = (
    "| preset | steps | batch | test accuracy | target | tutorial | wall time | device | date "
    "| command |\n|---|---|---|---|---|---|---|---|---|---|\n"
)


def device() -> str:
    """The GPU nvidia-smi names, else the CPU model and the cores this process may use."""
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except OSError:
        gpu = ""
    if gpu:
        return f"GPU: {gpu.splitlines()[0]}"
    return f"CPU: {cpu_cores()} cores, {cpu_model()}"


def run_preset(name: str, extra: list[str]) -> tuple[dict, dict, float]:
    """Params, metrics and wall seconds of `runner experiment=NAME`, run in a scratch folder."""
    with tempfile.TemporaryDirectory(prefix=f"seed-{name}-") as work:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "runner", *command(name, extra)[1:]],
            cwd=work,
            env=env,
            check=True,
        )
        wall = time.perf_counter() - start
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        [run] = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    return run.data.params, run.data.metrics, wall


def command(name: str, extra: list[str]) -> list[str]:
    return ["runner", f"experiment={name}", "trainer.progress_bar=false", *extra]


def result_row(name: str, extra: list[str]) -> str:
    """One results-table row for a full run of preset NAME."""
    params, metrics, wall = run_preset(name, extra)
    accuracy = metrics["test/accuracy"]
    verdict = "met" if accuracy >= TARGET[name] else "MISSED"
    return (
        f"| {name} | {params['trainer.steps']} | {params['data.batch_size']} | {accuracy:.4f} "
        f"| >= {TARGET[name]} ({verdict}) | {TUTORIAL[name]} | {wall / 60:.1f} min | {device()} "
        f"| {date.today()} | `uv run {' '.join(command(name, extra))}` |"
    )


def seed_spread(name: str, seeds: list[int], extra: list[str]) -> str:
    """A table of one preset's test accuracy for each seed, with mean, spread and hits."""
    rows, accuracies = [], []
    for seed in seeds:
        _, metrics, wall = run_preset(name, [*extra, f"seed={seed}"])
        accuracies.append(metrics["test/accuracy"])
        rows.append(f"| {seed} | {accuracies[-1]:.4f} | {wall / 60:.1f} min |")
        print(rows[-1], flush=True)
    hits = sum(a >= TARGET[name] for a in accuracies)
    return (
        f"{name} on {device()}, {date.today()}\n\n| seed | test accuracy | wall time |\n"
        "|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"mean {statistics.mean(accuracies):.4f}, "
        f"sd {statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0:.4f}, "
        f"min {min(accuracies):.4f}, max {max(accuracies):.4f}; "
        f"{hits} of {len(accuracies)} seeds reach >= {TARGET[name]}"
    )


def merge(rows: dict[str, str]) -> str:
    """The results table with `rows` replacing those of the same presets, in preset order;
    a `## Notes` section written under the table by hand is kept."""
    old, notes = {}, ""
    if RESULTS.exists():
        text = RESULTS.read_text()
        if NOTES in text:
            text, notes = text.split(NOTES, 1)
            notes = f"\n{NOTES}{notes}"
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("| ") and cells[0] in TUTORIAL:
                old[cells[0]] = line
    table = {**old, **rows}
    body = "".join(f"{table[name]}\n" for name in TUTORIAL if name in table)
    return (
        "# Seed tutorials reproduced\n\n"
        "Each row is one full run of a preset, measured by `benchmarks/reproduce_seeds.py`; "
        "wall time is the whole command, start-up and test evaluation included.\n\n"
        + HEADER
        + body
        + notes
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "presets", nargs="*", choices=[*TUTORIAL, []], metavar="PRESET", help=f"of {list(TUTORIAL)}"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra runner override for every preset (not for published rows)",
    )
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(s) for s in text.split(",")],
        help="comma-separated seeds: print each preset's accuracy spread over them instead "
        "of writing the results table",
    )
    args = parser.parse_args()
    args.presets = args.presets or list(TUTORIAL)
    made_by = f"uv run python benchmarks/reproduce_seeds.py {' '.join(sys.argv[1:])}"
    if args.seeds:
        for name in args.presets:
            print(f"\n{seed_spread(name, args.seeds, args.override)}\n\nmade by: {made_by}")
        return
    rows = {}
    for name in args.presets:
        rows[name] = result_row(name, args.override)
        print(rows[name], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(merge(rows))
    print(f"\nwrote {RESULTS.relative_to(REPO)}; made by: {made_by}")


if __name__ == "__main__":
    main()
