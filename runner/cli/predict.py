"""`runner-predict`: classify PNG images with a logged model, like the TF Layers guide's INFER
mode. Usage: `uv run runner-predict run_id=<run id> images=digit.png` (or a list, or a glob)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from runner.cli.train import CONF_DIR
from runner.config.schema import PredictConf, register_configs
from runner.errors import UserError, reported, run_hydra_app
from runner.targets import importable_from_cwd
from runner.tracking.model_choice import check_choice

if TYPE_CHECKING:  # NumPy and MLflow load where needed: --help and argument errors answer at once
    from runner.cli.prediction import Prediction

register_configs()


def image_paths(images: str | list[Any]) -> list[Path]:
    """`images` as files: a path, a glob, a folder (its PNGs) or a list of those."""
    patterns = [images] if isinstance(images, str) else list(images)
    if not patterns:
        raise UserError("images=[] names no image: pass images=<png, glob or folder>")
    paths = []
    for pattern in map(str, patterns):
        path = Path(pattern)
        matches = sorted(path.glob("*.png")) if path.is_dir() else sorted(glob.glob(pattern))
        if not matches:
            raise UserError(f"images={pattern!r} matches no file")
        paths += [Path(m) for m in matches]
    return paths


def predict(settings: PredictConf) -> list[Prediction]:
    """Each image's class and probabilities. The command line is checked before MLflow loads,
    and the images and the store before the backend does, which take seconds."""
    check_choice(settings.run_id, settings.model_uri)
    paths = image_paths(settings.images)
    from runner.cli import prediction  # MLflow, and Keras once the model's backend is chosen

    return prediction.predict(settings, paths)


def main() -> None:
    """The `runner-predict` command."""
    # MLflow draws a download bar on stderr for each of the run's small files it reads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    importable_from_cwd()
    run_hydra_app("runner-predict", run_hydra)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def run_hydra(cfg: DictConfig) -> None:
    with reported("runner-predict"):
        if OmegaConf.is_missing(cfg, "images"):
            raise UserError(
                "give the images to classify: images=<png, glob or folder> "
                "(or images='[a.png,b.png]')"
            )
        # Predicting records into no experiment: its name, `${data.name}`, is left empty, as
        # no data is named.
        cfg.tracking.experiment_name = ""
        results = predict(OmegaConf.to_object(cfg))
    for result in results:
        print(result)
