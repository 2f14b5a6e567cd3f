"""`runner-predict`: classify PNG images with a logged model, like the TF Layers guide's INFER
mode. Usage: `uv run runner-predict run_id=<run id> images=digit.png` (or a list, or a glob)."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from runner.cli.train import CONF_DIR
from runner.config.schema import register_configs
from runner.errors import UserError, reported, run_hydra_app
from runner.targets import importable_from_cwd

if TYPE_CHECKING:  # NumPy loads where it is needed: --help and argument errors answer at once
    import numpy as np

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
    """The decoded image, read before the backend loads so that a bad file is told at once."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None
    if image.mode.startswith("I"):  # 16- or 32-bit grey, which convert("L") would clip
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or wide.max() <= 65535 else wide.max()
        image = Image.fromarray(np.round(wide / top * 255).astype(np.uint8), "L")
    return image


def pixels(image: Any, path: Path, shape: tuple[int, ...], invert: bool) -> np.ndarray:
    """`image` as the model's input of `shape`, (height, width, channels) or, for a model of
    flat inputs, (height * width,): values in [0, 1], shrunk or stretched to height x width by
    area averaging, grey for one channel and RGB for three.

    A grey image whose colours are uniform and whose ink is in its alpha channel (black on
    transparent, say) is read by its alpha, opaque as light on dark like MNIST, whatever
    `invert` says: its grey levels alone would be blank. A blank image is classified with a
    warning, as its class means nothing."""
    import numpy as np
    from PIL import Image

    if len(shape) == 1:  # flat rows of a square grey image, as models logged before H x W x C
        side = int(round((shape[0] or 0) ** 0.5))
        if side * side != shape[0]:
            raise UserError(
                f"the model takes flat inputs of {shape[0]} values, not a square grey image: "
                f"runner-predict cannot lay a PNG out for it"
            )
        height, width, channels = side, side, 1
    elif len(shape) == 3:
        height, width, channels = shape
    else:
        raise UserError(f"the model takes inputs of shape {shape}, not images (H, W, C)")
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
    size = (width or converted.width, height or converted.height)  # None: any size it takes
    if converted.size != size:
        converted = converted.resize(size, Image.Resampling.BOX)
    values = np.asarray(converted, dtype=np.float32) / 255.0
    values = values.reshape(shape if len(shape) == 1 else (size[1], size[0], channels))
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
    checked before the backend loads, which takes seconds."""
    from runner.tracking.model_choice import check_choice

    if OmegaConf.is_missing(cfg, "images"):
        raise UserError(
            "give the images to classify: images=<png, glob or folder> (or images='[a.png,b.png]')"
        )
    check_choice(cfg.run_id, cfg.model_uri)
    paths = image_paths(cfg.images)
    images = [open_image(p) for p in paths]
    from runner.tracking import logged_model, store

    store.connect(cfg.tracking.uri)
    from runner import backends

    uri = logged_model.locate(cfg.run_id, cfg.model_uri)
    backends.select(str(cfg.backend or logged_model.backend_of(uri)))  # before Keras loads
    import numpy as np

    from runner.models import classifier

    found = logged_model.load(uri)
    shape = logged_model.input_shape(found.model)
    inputs = [pixels(i, p, shape, cfg.invert) for i, p in zip(images, paths, strict=True)]
    if len({x.shape for x in inputs}) == 1:
        outputs = found.model.predict(np.stack(inputs), verbose=0)
    else:  # a model of any image size, given images of several sizes: one at a time
        outputs = np.concatenate([found.model.predict(x[np.newaxis], verbose=0) for x in inputs])
    probabilities = classifier.probabilities(outputs, logged_model.emitted(found))
    picked = classifier.classes(probabilities)
    return [(p, int(c), row) for p, c, row in zip(paths, picked, probabilities, strict=True)]


def main() -> None:
    """The `runner-predict` command."""
    # MLflow draws a download bar on stderr for each of the run's small files it reads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    importable_from_cwd()
    run_hydra_app("runner-predict", run_hydra)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def run_hydra(cfg: DictConfig) -> None:
    with reported("runner-predict"):
        results = predict(cfg)
    import numpy as np

    for path, label, probabilities in results:
        shown = np.array2string(probabilities, precision=3, max_line_width=10**6)
        print(f"{path}: class {label}, probabilities = {shown}")
