"""`runner-repro RUN_ID`: rerun a logged run from its logged config and compare every metric
history step by step. Exits 0 when they agree (exactly, or within --rtol/--atol), 1 otherwise,
printing the first differing step of each metric and the environment differences that may
explain them.

`runner-repro RUN_ID --save FILE` writes what such a rerun needs (the command line's overrides,
config, environment, metric histories) to a small JSON file a repository can commit;
`runner-repro --golden FILE` composes today's conf/ with those overrides, refuses if the config
differs from the recorded one, and reruns it anywhere, into a scratch store, with no tracking
server; `--update` rewrites the file after an intended change."""

import argparse
import os
from pathlib import Path

from runner.errors import UserError, reported
from runner.targets import importable_from_cwd
from runner.tracking.golden import MACHINE_KEYS, machine_key


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # MLflow draws a download bar on stderr for each of the run's small files it reads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with reported("runner-repro"):
        check_overrides(args.overrides)  # told before MLflow loads, which takes a second
    from runner.cli import reruns  # MLflow and the training: seconds, once the arguments hold

    importable_from_cwd()
    if args.save:
        reruns.save_golden(args.run_id, args.save)
    elif args.golden:
        reruns.rerun_golden(
            args.golden, args.overrides, update=args.update, rtol=args.rtol, atol=args.atol
        )
    else:
        reruns.rerun_run(args.run_id, args.overrides, rtol=args.rtol or 0.0, atol=args.atol)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, refused where its options do not go together."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.run_id is None) == (args.golden is None):
        parser.error("give either a RUN_ID or --golden FILE")
    if args.save and (args.golden or args.overrides):
        parser.error("--save writes RUN_ID's golden file as it was logged: drop --golden and --set")
    if args.update and not args.golden:
        parser.error("--update rewrites a golden file: give --golden FILE")
    if args.update and any(not machine_key(o.partition("=")[0].strip()) for o in args.overrides):
        parser.error(
            "--update records today's config as conf/ composes it: --set may only say where "
            f"things are ({', '.join(MACHINE_KEYS[:-1])}); change conf/ instead"
        )
    return args


def check_overrides(overrides: list[str]) -> None:
    """Refuse a `--set` that is not KEY=VALUE."""
    for override in overrides:
        key, equals, _ = override.partition("=")
        if not equals or not key.strip():
            raise UserError(
                f"--set {override!r} is not KEY=VALUE: write it as, e.g., "
                f"--set data.dir=/data/mnist"
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner-repro",
        description=__doc__,
        usage="%(prog)s RUN_ID [--save FILE] | %(prog)s --golden FILE [--update] "
        "[--set KEY=VALUE ...] [--rtol R] [--atol A]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_id",
        nargs="?",
        help="the MLflow run to reproduce, or the registered model whose run it is "
        "(models:/NAME@ALIAS, models:/NAME/VERSION)",
    )
    parser.add_argument(
        "--save", type=Path, metavar="FILE", help="write RUN_ID's golden file, without a rerun"
    )
    parser.add_argument(
        "--golden",
        type=Path,
        metavar="FILE",
        help="rerun a golden file instead of a run, in a scratch store, with no tracking server",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="relative tolerance (default 0; for --golden, 1e-3 when the environment differs)",
    )
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="with --golden: after an intended change to conf/, rerun today's config and rewrite "
        "the file's config, environment and histories (keys that name the machine, "
        f"{', '.join(MACHINE_KEYS)}, never count as a change)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the logged config, e.g. --set data.dir=/data/mnist on another machine",
    )
    return parser
