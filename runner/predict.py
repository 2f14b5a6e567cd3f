"""`runner-predict`: classify PNG images with a logged model, like the TF Layers guide's INFER
mode. Usage: `uv run runner-predict run_id=<run id> images=digit.png` (or a list, or a glob)."""

import glob
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig

from runner.config import register_configs
from runner.errors import UserError
from runner.train import CONF_DIR

register_configs()


def image_paths(images: str | ListConfig) -> list[Path]:
    """`images` as files: a path, a glob, a folder (its PNGs) or a list of those."""
    patterns = [images] if isinstance(images, str) else list(images)
    paths = []
    for pattern in map(str, patterns):
        path = Path(pattern)
        matches = sorted(path.glob("*.png")) if path.is_dir() else sorted(glob.glob(pattern))
        if not matches:
            raise UserError(f"images={pattern!r} matches no file")
        paths += [Path(m) for m in matches]
    return paths


def read_digit(path: Path, invert: bool) -> np.ndarray:
    """784 grey levels in [0, 1]; larger images are shrunk to 28x28 by area averaging."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("L")
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None
    if image.size != (28, 28):
        image = image.resize((28, 28), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32).reshape(784) / 255.0
    return 1.0 - pixels if invert else pixels


def predict(cfg: DictConfig) -> list[tuple[Path, int, np.ndarray]]:
    from runner.tensorflow_logs import load_tensorflow

    load_tensorflow()  # before anything else imports it
    import keras

    from runner import logged_model

    paths = image_paths(cfg.images)
    found = logged_model.load(cfg.run_id, cfg.model_uri, cfg.tracking_uri)
    outputs = found.model.predict(np.stack([read_digit(p, cfg.invert) for p in paths]), verbose=0)
    if not logged_model.outputs_probabilities(found.model):
        outputs = keras.ops.convert_to_numpy(keras.ops.softmax(outputs))
    return [(p, int(row.argmax()), row) for p, row in zip(paths, outputs, strict=True)]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        results = predict(cfg)
    except UserError as error:
        raise SystemExit(f"runner-predict: error: {error}") from None
    for path, label, probabilities in results:
        print(
            f"{path}: class {label}, probabilities = {np.array2string(probabilities, precision=3)}"
        )
