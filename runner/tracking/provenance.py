"""Where a run came from, as it records it: its config (parameters, config.yaml and Hydra's
record of the command), the data that trained it, and its environment and code.

A new run records its config and data once; each time a run is opened, resumed too, it records
the environment it runs in, so that a difference between two runs can be explained.
"""

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data import from_numpy
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from runner.backends.base import Backend
from runner.data import Splits, file_record
from runner.masking import mask
from runner.targets import label
from runner.tracking import environment


@dataclass(frozen=True)
class Provenance:
    """What a run records of where it came from: the resolved config, the data split from it,
    the backend it runs on, and the folder where Hydra recorded the command, if it did."""

    config: dict[str, Any]
    splits: Splits
    backend: Backend
    hydra_dir: Path | None = None

    def log(self, new: bool) -> None:
        """Into the active run: the config and data if the run is `new`, and the environment."""
        if new:
            log_config(self.config, self.hydra_dir)
            log_dataset(self.splits, self.config["data"])
        log_environment(self.config, self.splits.digests, self.backend)


def log_config(config: dict[str, Any], hydra_dir: Path | None) -> None:
    """The resolved `config` as the run's parameters and config.yaml, its model and optimizer
    as tags, and Hydra's record of the command (its overrides) from `hydra_dir`, if any."""
    mlflow.log_params(
        {
            key: value if value is None or isinstance(value, int | float) else mask(str(value))
            for key, value in flatten(config)
        }
    )
    mlflow.set_tags({"model": label(config["model"]), "optimizer": label(config["optimizer"])})
    mlflow.log_text(mask(OmegaConf.to_yaml(config)), "config.yaml")
    if hydra_dir is not None and hydra_dir.is_dir():
        mlflow.log_artifacts(str(hydra_dir), "hydra")


def log_dataset(splits: Splits, data: Mapping[str, Any]) -> None:
    """The data's record in MLflow's Datasets, one per split: its name, size and digest, so that
    the UI shows which data trained the run; `data` is the config's data option. MLflow keeps
    one record per name and digest, which each split's own digest (its content: `Split.digest`)
    keeps from another run's subset."""
    source = mask(str(data.get("path") or data.get("dir") or data.get("_target_")))
    for context, split in (
        ("training", splits.train),
        ("validation", splits.validation),
        ("test", splits.test),
    ):
        with warnings.catch_warnings():  # that a path is a local file, said twice per split
            warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
            dataset = from_numpy(
                split.x,
                targets=split.y,
                source=source,
                name=f"{label(data)}-{context}",
                digest=split.digest,
            )
        try:
            mlflow.log_input(dataset, context=context)
        except MlflowException as error:
            if not _duplicate(error):
                raise
            mlflow.log_input(dataset, context=context)


def _duplicate(error: MlflowException) -> bool:
    """Whether the store refused a record that another run added at the same moment: it looks
    for a dataset, finds none and inserts it, so of two runs logging the same new dataset at
    once (a sweep's first jobs) the second is refused; asked again, it links the one now there."""
    text = str(error.message)
    return any(hint in text for hint in ("UniqueViolation", "UNIQUE constraint", "duplicate key"))


def log_environment(config: dict[str, Any], data_digests: dict[str, str], backend: Backend) -> None:
    """environment.json and its tags: versions, devices, commit, the data's digests and file,
    and the user's own code that the resolved `config`'s targets name, with its sources."""
    described = environment.describe(data_digests, backend)
    record = file_record(config["data"])
    if record:  # the file data.path names, whose change runner-repro and runner-eval tell
        described["data_file"] = record
    # The user's own model, data, optimizer, loss or callbacks: their commit, and their sources.
    modules = environment.user_modules(config)
    if modules:
        described["user_code"] = environment.user_code(modules)
        for name, file in modules.items():
            mlflow.log_artifact(str(file), environment.source_folder(name, file))
    mlflow.set_tags(environment.tags(described))
    mlflow.log_dict(described, "environment.json")


def flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested config to dotted keys: {"optimizer": {"lr": 0.5}} -> ("optimizer.lr", 0.5)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
