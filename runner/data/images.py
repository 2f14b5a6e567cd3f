"""Image files read as a model's inputs: PNGs of any mode decoded, then laid out as the model's
input shape takes them, for `runner-predict`."""

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from runner.errors import UserError

log = logging.getLogger(__name__)


def open_image(path: Path) -> Any:
    """The decoded image, read before the backend loads so that a bad file is told at once."""
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
