"""`runner-compare`: the runs of a sweep, of several sweeps, or of a whole experiment, side by
side.

One row a run: its sweep (when several are compared), its name and status, the parameters that
differ between the runs, and the final value of the chosen metrics, sorted by one of them. The
same table is logged to a sweep's parent run when the sweep ends (`runner.sweeps.nested_runs`);
`--plot FILE` draws the runs' validation curves in one PNG. With `--over KEY` (`--over seed`),
one row a group of runs that differ only in the parameter KEY: the mean, standard deviation and
count of each metric over the group, and one curve a group, its mean in a band of ±1 deviation.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from runner.errors import reported
from runner.tracking.comparison_defaults import CURVE, DEFAULT_METRICS, DEFAULT_SORT, FORMATS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="runner-compare",
        description="Compare the runs of a sweep (the latest by default) or of an experiment.",
    )
    parser.add_argument(
        "--parent",
        metavar="RUN_ID",
        action="append",
        default=[],
        help="a sweep's parent run; repeat it to put several sweeps side by side",
    )
    parser.add_argument(
        "--all", action="store_true", help="every run of the experiment instead of one sweep"
    )
    parser.add_argument("--experiment", default="mnist", help="experiment name (default: mnist)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="METRIC",
        help=f"final values to show (default: {' '.join(DEFAULT_METRICS)})",
    )
    parser.add_argument(
        "--sort",
        metavar="METRIC",
        help=f"best first by this metric: lowest for a loss, else highest (default: "
        f"{DEFAULT_SORT} where the runs have it)",
    )
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    parser.add_argument(
        "--over",
        metavar="KEY",
        help="one row a group of runs that differ only in this parameter (seed, say): each "
        "metric's mean, standard deviation and count over the group",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help=f"draw the runs' {CURVE} curves in this PNG (with --over, each group's mean and "
        f"standard deviation)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="the MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from runner.tracking import comparison  # pandas and MLflow: once the arguments are parsed

    with reported("runner-compare"):
        rows = comparison.compared(
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            parents=args.parent,
            everything=args.all,
            metrics=args.metrics,
            sort_by=args.sort,
            over=args.over,
            plot=args.plot,
        )
    sys.stdout.write(comparison.render(rows, args.format))


if __name__ == "__main__":
    main()
