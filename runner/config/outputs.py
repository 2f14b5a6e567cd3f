"""Output folders that no two runs share.

Hydra's default `outputs/<date>/<time>` names the same folder for two runs started in the same
second, which then overwrite each other's checkpoints and logged Hydra config. The `unique_dir`
resolver, which conf/config.yaml's `hydra.run.dir` and `hydra.sweep.dir` go through, creates the
folder itself and takes the next free name (`<time>_2`, `<time>_3`, ...) when another run holds
it. OmegaConf caches its value in the config, which Hydra copies into each job's config, so
every reading in the run (and in a sweep's job processes) gives the same folder.
"""

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from runner.errors import UserError, reported

RESOLVER = "unique_dir"


def unique_dir(path: str) -> str:
    """Create `path`, or the first of `path_2`, `path_3`, ... that does not exist yet, and return
    it. A plain mkdir fails on a folder that exists, so two processes never get the same one."""
    base = folder = Path(path)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for number in itertools.count(2):
            try:
                folder.mkdir()
                return str(folder)
            except FileExistsError:
                folder = base.with_name(f"{base.name}_{number}")
    except OSError as error:
        raise UserError(
            f"cannot create the output folder {base} in {_existing_parent(base)} "
            f"({error.strerror}): run from a folder you can write to, or write elsewhere with "
            f"hydra.run.dir=DIR (hydra.sweep.dir=DIR with -m) and "
            f"tracking.uri=sqlite:////DIR/mlflow.db"
        ) from None


def check_given_dirs(overrides: Sequence[str]) -> None:
    """Refuse a `hydra.run.dir=` or `hydra.sweep.dir=` override that names a folder nobody can
    create, with one line: Hydra creates it before the runner's code runs, and fails with a
    traceback. (The default folders go through `unique_dir`, which reports the same.)"""
    for override in overrides:
        key, _, value = override.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value:
            path = Path(value)
            nearest = path if path.is_dir() else _existing_parent(path)
            if not os.access(nearest, os.W_OK):
                raise UserError(
                    f"cannot write the output folder {value}: {nearest} is read-only; point "
                    f"{key} at a folder you can write to"
                )


def _existing_parent(path: Path) -> Path:
    """The nearest folder of `path` that exists: the one that refused the new folder."""
    absolute = path.absolute()
    return next(folder for folder in absolute.parents if folder.exists())


def _resolve(path: str) -> str:
    # OmegaConf wraps an Exception raised here, and Hydra prints it with a traceback; the
    # SystemExit of `reported` passes through both.
    with reported("runner"):
        return unique_dir(path)


def hydra_subdir(resume: str, stamp: str) -> str:
    """Where in the run's folder Hydra records the command (config.yaml, overrides.yaml):
    `.hydra`, but `.hydra/resumed-<stamp>` for a resumed run, whose folder holds the first
    command's record, which Hydra would otherwise overwrite."""
    return ".hydra" if str(resume).lower() == "false" else f".hydra/resumed-{stamp}"


def register_resolvers() -> None:
    """Make `${unique_dir:PATH}` and `${hydra_subdir:RESUME,STAMP}` available; called before
    Hydra composes the config."""
    OmegaConf.register_new_resolver(RESOLVER, _resolve, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir, use_cache=True, replace=True)
