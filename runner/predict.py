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
from runner.targets import importable_from_cwd
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


def open_image(path: Path) -> Any:
    """The decoded image, read before TensorFlow loads so that a bad file is told at once."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None
    return image


def pixels(image: Any, path: Path, shape: tuple[int, ...], invert: bool) -> np.ndarray:
    """`image` as the model's input of `shape`, (height, width, channels) or, for a model of
    flat inputs, (height * width,): values in [0, 1], shrunk or stretched to height x width by
    area averaging, grey for one channel and RGB for three.

    A grey image whose colours are uniform and whose ink is in its alpha channel (black on
    transparent, say) is read by its alpha, opaque as light on dark like MNIST, whatever
    `invert` says: its grey levels alone would be blank. A blank image is classified with a
    warning, as its class means nothing."""
    from PIL import Image

    if len(shape) == 1:
        side = int(round(shape[0] ** 0.5))
        height, width, channels = side, side, 1
    else:
        height, width, channels = shape
    if channels not in (1, 3):
        raise UserError(
            f"the model takes images of {channels} channels; runner-predict reads grey (1) or "
            f"RGB (3) images only"
        )
    if channels == 1:
        converted = image.convert("L")
        if _uniform(converted) and _has_alpha(image):
            alpha = image.convert("RGBA").getchannel("A")
            if not _uniform(alpha):
                converted, invert = alpha, False
    else:
        converted = image.convert("RGB")
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BOX)
    values = np.asarray(converted, dtype=np.float32).reshape(shape) / 255.0
    if values.min() == values.max():
        log.warning("warning: %s is blank (every pixel alike): its class means nothing", path)
    return 1.0 - values if invert else values


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
    images = [open_image(p) for p in paths]
    from runner import tracking

    tracking.connect(cfg.tracking.uri)
    from runner.tensorflow_logs import load_tensorflow

    load_tensorflow()  # before anything else imports it
    import keras

    found = logged_model.load(cfg.run_id, cfg.model_uri)
    shape = tuple(found.model.inputs[0].shape[1:])
    batch = np.stack([pixels(i, p, shape, cfg.invert) for i, p in zip(images, paths, strict=True)])
    outputs = found.model.predict(batch, verbose=0)
    if not logged_model.outputs_probabilities(found):
        outputs = keras.ops.convert_to_numpy(keras.ops.softmax(outputs))
    return [(p, int(row.argmax()), row) for p, row in zip(paths, outputs, strict=True)]


def main() -> None:
    """The `runner-predict` command."""
    importable_from_cwd()
    run_hydra_app("runner-predict", run_hydra)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def run_hydra(cfg: DictConfig) -> None:
    with reported("runner-predict"):
        results = predict(cfg)
    for path, label, probabilities in results:
        shown = np.array2string(probabilities, precision=3, max_line_width=10**6)
        print(f"{path}: class {label}, probabilities = {shown}")
