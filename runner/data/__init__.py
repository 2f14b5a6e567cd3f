"""The data a run trains on: a loader's arrays checked, scaled and split (each backend batches
them, `runner.backends`). The runner's loaders, the `_target_`s of conf/data/, are here by the
names the configs give them: `idx_files` (of `runner.data.idx`) and `npz_file`."""

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from runner import targets
from runner.data import idx_cache
from runner.data.idx import (
    FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    check_sha256,
    download,
    folder,
    idx_files,
    parse_idx,
    read_idx,
)
from runner.errors import UserError

__all__ = [
    "FILES",
    "TEST_IMAGES",
    "TEST_LABELS",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "check_sha256",
    "download",
    "folder",
    "idx_files",
    "parse_idx",
    "read_idx",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Images as float32 (N, height, width, channels), and their integer labels."""

    x: np.ndarray
    y: np.ndarray
    # Identifies the split's content (see `_rows`), for its MLflow dataset record; "" if unknown.
    digest: str = ""


@dataclass(frozen=True)
class Splits:
    train: Split
    validation: Split
    test: Split
    num_classes: int
    # SHA-256 of each array the loader returned (x_train, y_train, x_test, y_test).
    digests: dict[str, str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load(option: Mapping[str, Any], own: Any) -> Splits:
    """The `data` option's loader's arrays, checked, scaled and split as the tutorials split
    MNIST: the first `validation_size` training examples validate, the rest train; `limit`
    keeps the first examples of each split. uint8 pixels are scaled to [0, 1]. `own` holds the
    option's keys that the runner reads (`runner.config.schema.DataKeys`), which the loader
    does not get."""
    (x_train, y_train, x_test, y_test), digests, where = _arrays(option, own)
    n_val = own.validation_size
    if not 0 < n_val < len(y_train):
        raise UserError(
            f"data.validation_size={n_val} must be between 1 and {len(y_train) - 1}, "
            f"the training examples found"
        )
    n = own.limit
    found = {"digests": digests, "where": where}
    train = {"part": "train", **found}
    splits = Splits(
        train=_rows(x_train, y_train, range(n_val, len(y_train))[:n], **train),
        validation=_rows(x_train, y_train, range(n_val)[:n], **train),
        test=_rows(x_test, y_test, range(len(y_test))[:n], part="test", **found),
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
        digests=digests,
    )
    _warn_of_labels(splits, int(y_train.min()), where)
    # uint8 pixels are scaled to [0, 1] by construction: only float images need the look.
    raw = {"training": x_train, "validation": x_train, "test": x_test}
    parts = {"training": splits.train, "validation": splits.validation, "test": splits.test}
    _warn_of_unscaled(
        {name: split for name, split in parts.items() if raw[name].dtype != np.uint8}, where
    )
    return splits


def _warn_of_labels(splits: Splits, first_label: int, where: str) -> None:
    """One warning line for each sign of labels that train, but likely not as meant: labels
    that do not start at 0, a class the training split lacks. The run goes on, as such data may
    be meant."""
    if first_label > 0:
        log.warning(
            "%s: y_train's labels start at %d, not 0, so the model gets outputs for classes "
            "with no example: number the classes from 0 (subtract %d from the labels)",
            where,
            first_label,
            first_label,
        )
    present = set(np.unique(splits.train.y).tolist())
    missing = [k for k in range(first_label, splits.num_classes) if k not in present]
    if missing:
        named = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        log.warning(
            "%s: the training split has no example of class %s, which the model cannot learn: "
            "check the labels (or raise data.limit)",
            where,
            named,
        )


def _warn_of_unscaled(parts: dict[str, Split], where: str) -> None:
    """One warning line if the float images of `parts` (by split name) go beyond 1: likely
    0-255 pixels left unscaled. The run goes on, as such data may be meant."""
    highest = {name: float(split.x.max()) for name, split in parts.items()}
    beyond = [name for name, value in highest.items() if value > 1]
    if beyond:
        named = beyond[-1] if len(beyond) == 1 else f"{', '.join(beyond[:-1])} and {beyond[-1]}"
        log.warning(
            "%s: the images of the %s split%s reach %g, beyond 1: probably unscaled 0-255 "
            "pixels; divide the float images by 255, or store them as uint8, which the runner "
            "scales to [0, 1]",
            where,
            named,
            "s" if len(beyond) > 1 else "",
            max(highest.values()),
        )


def _rows(
    x: np.ndarray, y: np.ndarray, rows: range, *, part: str, digests: dict[str, str], where: str
) -> Split:
    """The `rows` of the loader's `part` (train or test) as a split, with a digest of its
    content: the digests of the loader's two arrays and the rows kept identify it exactly, at no
    cost, where hashing the split's scaled images would add seconds to a run's start."""
    split = _split(x[rows.start : rows.stop], y[rows.start : rows.stop], f"{where}: x_{part}")
    named = f"{digests[f'x_{part}']} {digests[f'y_{part}']} rows {rows.start}:{rows.stop}"
    return replace(split, digest=hashlib.sha256(named.encode()).hexdigest()[:16])


def load_test(option: Mapping[str, Any], own: Any) -> Split:
    """Only the test split (its first `own.limit` examples), for evaluating a trained model."""
    (_, _, x_test, y_test), _, where = _arrays(option, own)
    return _split(x_test[: own.limit], y_test[: own.limit], f"{where}: x_test")


def _arrays(option: Mapping[str, Any], own: Any) -> tuple[list[np.ndarray], dict[str, str], str]:
    """The loader's four arrays, checked: images (N, H, W, C), a channel axis added where
    missing, labels as int32 (N,) in 0..K-1; the SHA-256 of each array as the loader returned
    it; and the loader's name for messages. Images are scaled later (`_split`), only the rows a
    run keeps, which makes a run with `data.limit` quick."""
    loaded = targets.build(option, "data", [f.name for f in fields(own)])
    where = f"data ({option['_target_']})"
    try:
        (x_train, y_train), (x_test, y_test) = loaded
    except (TypeError, ValueError):
        raise UserError(
            f"{where} returned {type(loaded).__name__}, not ((x_train, y_train), (x_test, "
            f"y_test)) as keras.datasets loaders do"
        ) from None
    raw = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    raw = {name: np.asarray(array) for name, array in raw.items()}
    checked = {}
    for split in ("train", "test"):
        x, y = raw[f"x_{split}"], raw[f"y_{split}"]
        checked[f"x_{split}"] = _images(x, f"{where}: x_{split}")
        checked[f"y_{split}"] = _labels(y, f"{where}: y_{split}")
        if len(x) != len(y):
            raise UserError(f"{where}: x_{split} holds {len(x)} examples but y_{split} {len(y)}")
    if checked["x_train"].shape[1:] != checked["x_test"].shape[1:]:
        raise UserError(
            f"{where}: training images are {checked['x_train'].shape[1:]} but test images "
            f"{checked['x_test'].shape[1:]}"
        )
    digests = {name: idx_cache.array_sha256(raw[name]) for name in ARRAYS}
    return [checked[name] for name in ARRAYS], digests, where


def _images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim not in (3, 4) or len(x) == 0:
        raise UserError(
            f"{where} has shape {x.shape}: expected images of shape (N, height, width) or "
            f"(N, height, width, channels)"
        )
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise UserError(f"{where} holds {x.dtype} values, not numbers")
    return x[..., np.newaxis] if x.ndim == 3 else x


def _split(x: np.ndarray, y: np.ndarray, where: str) -> Split:
    """Images as float32, uint8 pixels scaled to [0, 1]."""
    if x.dtype == np.uint8:
        return Split(x.astype(np.float32) / 255.0, y)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{where} holds NaN or infinite values: the model would learn nothing")
    return Split(x, y)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # keras.datasets' CIFAR sets store labels as (N, 1)
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(
            f"{where} has shape {y.shape} and type {y.dtype}: expected integer class labels "
            f"of shape (N,)"
        )
    if len(y) and y.min() < 0:
        raise UserError(f"{where} holds the label {y.min()}: labels must be 0, 1, 2, ...")
    return y.astype(np.int32)


def npz_file(path: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The arrays of a `.npz` laid out as `keras.datasets` stores them: x_train, y_train,
    x_test, y_test."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data.path={path}: no such file; point it at a .npz file")
    try:
        with np.load(file, allow_pickle=False) as stored:
            missing = [name for name in ARRAYS if name not in stored.files]
            if missing:
                raise UserError(
                    f"data.path={path}: the .npz holds no {', '.join(missing)}; it needs "
                    f"x_train, y_train, x_test and y_test (it holds {', '.join(stored.files)})"
                )
            arrays = [stored[name] for name in ARRAYS]
    except (OSError, ValueError) as error:
        raise UserError(f"data.path={path}: not a readable .npz file ({error})") from None
    return (arrays[0], arrays[1]), (arrays[2], arrays[3])


def absolute_paths(node: Any) -> None:
    """Make the data option's `path` and `dir` absolute, relative ones against the working
    folder: the run's params, config.yaml and checkpoints then name its files wherever they are
    read (runner-eval, runner-repro from another folder). A user's loader may take a `path` that
    is no file (a data set's name): that is kept unless such a file exists here."""
    own = str(node.get("_target_", "")).startswith(f"{__name__}.")
    for key in ("path", "dir"):
        given = node.get(key)
        if not isinstance(given, str) or "://" in given:
            continue
        path = Path(given).expanduser()
        if (own or path.exists()) and os.path.abspath(path) != given:
            node[key] = os.path.abspath(path)


def file_record(node: Any) -> dict[str, str] | None:
    """The file the data option's `path` names, absolute, with its SHA-256; None unless it names
    one. A run keeps it (environment.json's `data_file`), so a file changed since is told."""
    given = node.get("path")
    if not isinstance(given, str) or not Path(given).expanduser().is_file():
        return None
    path = Path(given).expanduser()
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return {"path": os.path.abspath(path), "sha256": digest}


def warn_if_changed(node: Any, recorded: dict[str, str] | None) -> None:
    """One warning line if the file `node.path` names, the one a run `recorded` (`file_record`),
    has changed since: results on it may differ from the run's."""
    now = file_record(node)
    if not recorded or not now or now["path"] != recorded.get("path"):
        return
    if now["sha256"] != recorded.get("sha256"):
        log.warning(
            "data.path=%s has changed since the run trained on it (SHA-256 %s then, %s now): "
            "results on it may differ from the run's",
            now["path"],
            recorded.get("sha256"),
            now["sha256"],
        )


def check_batch_fits(n: int, batch_size: int) -> None:
    """A training batch must fit in the training split, which it is drawn from without
    replacement."""
    if batch_size > n:
        raise UserError(
            f"a training batch of {batch_size} examples (data.batch_size times the replicas) "
            f"exceeds the {n} training examples: lower data.batch_size, or raise data.limit"
        )
