"""`runner-predict`: classify PNG images with a logged model, like the TF Layers guide's INFER
mode. Usage: `uv run runner-predict run_id=<run id> images=digit.png` (or a list, or a glob)."""

import glob
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from runner.config import register_configs
from runner.errors import UserError, reported, run_hydra_app
from runner.train import CONF_DIR

register_configs()
log = logging.getLogger(__name__)


def image_paths(images: str | ListConfig) -> list[Path]:
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


def read_digit(path: Path, invert: bool) -> np.ndarray:
    """784 grey levels in [0, 1]; larger images are shrunk to 28x28 by area averaging.

    An image whose colours are uniform and whose ink is in its alpha channel (black on
    transparent, say) is read by its alpha, opaque as light on dark like MNIST, whatever
    `invert` says: its grey levels alone would be blank. A blank image is classified with a
    warning, as its class means nothing."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        grey = image.convert("L")
        if _uniform(grey) and _has_alpha(image):
            alpha = image.convert("RGBA").getchannel("A")
            if not _uniform(alpha):
                grey, invert = alpha, False
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None
    if grey.size != (28, 28):
        grey = grey.resize((28, 28), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.float32).reshape(784) / 255.0
    if pixels.min() == pixels.max():
        log.warning("warning: %s is blank (every pixel alike): its class means nothing", path)
    return 1.0 - pixels if invert else pixels


def _uniform(band: Any) -> bool:
    low, high = band.getextrema()
    return low == high


def _has_alpha(image: Any) -> bool:
    return "A" in image.getbands() or "transparency" in image.info


def predict(cfg: DictConfig) -> list[tuple[Path, int, np.ndarray]]:
    """Each image's class and probabilities. The command line, the images and the store are
    checked before TensorFlow loads, which takes seconds."""
    from runner import logged_model

    if OmegaConf.is_missing(cfg, "images"):
        raise UserError(
            "give the images to classify: images=<png, glob or folder> (or images='[a.png,b.png]')"
        )
    logged_model.check_choice(cfg.run_id, cfg.model_uri)
    paths = image_paths(cfg.images)
    pixels = np.stack([read_digit(p, cfg.invert) for p in paths])
    from runner import tracking

    tracking.connect(cfg.tracking_uri)
    from runner.tensorflow_logs import load_tensorflow

    load_tensorflow()  # before anything else imports it
    import keras

    found = logged_model.load(cfg.run_id, cfg.model_uri)
    outputs = found.model.predict(pixels, verbose=0)
    if not logged_model.outputs_probabilities(found.model):
        outputs = keras.ops.convert_to_numpy(keras.ops.softmax(outputs))
    return [(p, int(row.argmax()), row) for p, row in zip(paths, outputs, strict=True)]


def main() -> None:
    """The `runner-predict` command."""
    run_hydra_app("runner-predict", run_hydra)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def run_hydra(cfg: DictConfig) -> None:
    with reported("runner-predict"):
        results = predict(cfg)
    for path, label, probabilities in results:
        shown = np.array2string(probabilities, precision=3, max_line_width=10**6)
        print(f"{path}: class {label}, probabilities = {shown}")
