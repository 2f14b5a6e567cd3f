"""`runner-eval`: a logged model's loss and accuracy on its data's test set, like the TF Layers
guide's `evaluate()`. Usage: `uv run runner-eval run_id=<run id>` or `model_uri=models:/<id>`."""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from runner.cli.train import CONF_DIR
from runner.config.schema import EvaluateConf, register_configs
from runner.errors import UserError, reported, run_hydra_app
from runner.targets import importable_from_cwd
from runner.tracking.model_choice import check_choice

register_configs()


def evaluate(settings: EvaluateConf) -> dict[str, float | int | None]:
    """Loss, accuracy and the optimizer step the model reached. The command line is checked
    before MLflow loads, and the store before the backend does, which take seconds."""
    check_choice(settings.run_id, settings.model_uri)
    from runner.cli import evaluation  # MLflow, and Keras once the model's backend is chosen

    return evaluation.evaluate(settings)


def main() -> None:
    """The `runner-eval` command."""
    # MLflow draws a download bar on stderr for each of the run's small files it reads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    importable_from_cwd()
    run_hydra_app("runner-eval", run_hydra)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def run_hydra(cfg: DictConfig) -> None:
    with reported("runner-eval"):
        # Evaluating records into no experiment: its name, `${data.name}`, is left empty, as
        # no data is named until the run's is read.
        cfg.tracking.experiment_name = ""
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:  # a `???` left in the data option (`data=npz` without `data.path`)
            raise UserError(
                f"{missing[0]} is not set: give it on the command line, {missing[0]}=VALUE"
            )
        print(evaluate(OmegaConf.to_object(cfg)))
