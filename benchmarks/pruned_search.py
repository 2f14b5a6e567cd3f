"""The cnn_optuna search with and without pruning: wall time and best val/accuracy of each.

    uv run python benchmarks/pruned_search.py                  # the 20-trial search, twice
    uv run python benchmarks/pruned_search.py --trials 5 --pruners none median hyperband
    uv run python benchmarks/pruned_search.py --trials 2 --set trainer.steps=200   # a try

Each pruner's search runs as `runner hparams_search=cnn_optuna hydra.sweeper.pruner=P` in its
own subprocess and scratch folder (its study and MLflow store start empty), one after the
other, so that they do not share the CPU; the wall time is the whole command's. The table is
printed in Markdown, with the command that made it, for docs/pruning.md.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from runner.backends.devices import cpu_cores
from runner.tracking.environment import cpu_model


def search(folder: Path, pruner: str, trials: int, overrides: list[str]) -> float:
    """Run the search in `folder`; its wall time in seconds."""
    folder.mkdir(parents=True)
    command = [
        str(Path(sys.executable).with_name("runner")),
        "hparams_search=cnn_optuna",
        f"hydra.sweeper.pruner={pruner}",
        f"hydra.sweeper.n_trials={trials}",
        *overrides,
    ]
    # The data's default folder is relative to where this was started, not to `folder`.
    data = os.environ.get("MNIST_DIR", str(Path("data/mnist").absolute()))
    start = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=folder,
        env={**os.environ, "MNIST_DIR": data},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode:
        sys.exit(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def row(folder: Path, pruner: str, wall_s: float) -> str:
    """The table's row for the search in `folder`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="cnn_optuna", storage=f"sqlite:///{folder}/optuna.db")
    count = {s: sum(t.state == s for t in study.trials) for s in TrialState}
    pruned_at = sorted(
        max(t.intermediate_values) for t in study.trials if t.state == TrialState.PRUNED
    )
    best = study.best_trial
    params = ", ".join(f"{k}={v:.3g}" for k, v in sorted(best.params.items()))
    return (
        f"| {pruner} | {count[TrialState.COMPLETE]} | {count[TrialState.PRUNED]} "
        f"| {', '.join(map(str, pruned_at)) or '-'} | {wall_s / 60:.1f} min "
        f"| {best.value:.4f} (trial {best.number}: {params}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pruners", nargs="+", default=["none", "median"])
    parser.add_argument("--set", nargs="*", default=[], help="more overrides: KEY=VALUE ...")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for pruner in args.pruners:
            folder = Path(scratch) / pruner
            wall_s = search(folder, pruner, args.trials, args.set)
            rows.append(row(folder, pruner, wall_s))
    print(f"{args.trials}-trial cnn_optuna search, {cpu_model()}, {cpu_cores()} cores\n")
    print("| pruner | completed | pruned | pruned at steps | wall time | best val/accuracy |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n`uv run python {' '.join(['benchmarks/pruned_search.py', *sys.argv[1:]])}`")


if __name__ == "__main__":
    main()
