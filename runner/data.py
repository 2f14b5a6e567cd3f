"""The data a run trains on: a loader's arrays checked, scaled and split (each backend batches
them, `runner.backends`); and the loader of IDX files (MNIST, Fashion-MNIST): find or download
them, verify them, decode them."""

import gzip
import hashlib
import http.client
import logging
import os
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from runner.errors import UserError

log = logging.getLogger(__name__)

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08
# Where the runner's IDX options look when data.dir is not given.
_DIR_DEFAULTS = "data=mnist defaults to $MNIST_DIR, data=fashion_mnist to $FASHION_MNIST_DIR"


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


# The keys of a `data` option that the runner reads; the others go to its loader (`_target_`).
RUNNER_KEYS = ("name", "batch_size", "eval_batch_size", "validation_size", "limit")
ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load(cfg: Any) -> Splits:
    """The `data` option's loader's arrays, checked, scaled and split as the tutorials split
    MNIST: the first `validation_size` training examples validate, the rest train; `limit`
    keeps the first examples of each split. uint8 pixels are scaled to [0, 1]."""
    (x_train, y_train, x_test, y_test), digests, where = _arrays(cfg)
    n_val = cfg.validation_size
    if not 0 < n_val < len(y_train):
        raise UserError(
            f"data.validation_size={n_val} must be between 1 and {len(y_train) - 1}, "
            f"the training examples found"
        )
    n = cfg.limit
    splits = Splits(
        train=_rows(x_train, y_train, range(n_val, len(y_train))[:n], "train", digests, where),
        validation=_rows(x_train, y_train, range(n_val)[:n], "train", digests, where),
        test=_rows(x_test, y_test, range(len(y_test))[:n], "test", digests, where),
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
    x: np.ndarray, y: np.ndarray, rows: range, part: str, digests: dict[str, str], where: str
) -> Split:
    """The `rows` of the loader's `part` (train or test) as a split, with a digest of its
    content: the digests of the loader's two arrays and the rows kept identify it exactly, at no
    cost, where hashing the split's scaled images would add seconds to a run's start."""
    split = _split(x[rows.start : rows.stop], y[rows.start : rows.stop], f"{where}: x_{part}")
    named = f"{digests[f'x_{part}']} {digests[f'y_{part}']} rows {rows.start}:{rows.stop}"
    return replace(split, digest=hashlib.sha256(named.encode()).hexdigest()[:16])


def load_test(cfg: Any) -> Split:
    """Only the test split (its first `limit` examples), for evaluating a trained model."""
    (_, _, x_test, y_test), _, where = _arrays(cfg)
    return _split(x_test[: cfg.limit], y_test[: cfg.limit], f"{where}: x_test")


def _arrays(cfg: Any) -> tuple[list[np.ndarray], dict[str, str], str]:
    """The loader's four arrays, checked: images (N, H, W, C), a channel axis added where
    missing, labels as int32 (N,) in 0..K-1; the SHA-256 of each array as the loader returned
    it; and the loader's name for messages. Images are scaled later (`_split`), only the rows a
    run keeps, which makes a run with `data.limit` quick."""
    from runner import targets

    loaded = targets.build(cfg, "data", RUNNER_KEYS)
    where = f"data ({cfg._target_})"
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
    digests = {name: _sha256(raw[name]) for name in ARRAYS}
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


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def idx_files(
    dir: str,
    download: bool = False,
    mirrors: list[str] | None = None,
    sha256: dict[str, str] | None = None,
    download_timeout_s: float = 60.0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST's four IDX files (or Fashion-MNIST's, which has the same names and layout) in
    `dir`, gzipped or not, downloaded from `mirrors` if missing and allowed, each checked
    against its `sha256`: the digest of the file as served (gzipped) or of its decompressed
    content, since releases publish one or the other."""
    source = _IdxSource(folder(dir), download, mirrors or [], sha256 or {}, download_timeout_s)
    return source.read(TRAIN_IMAGES, TRAIN_LABELS), source.read(TEST_IMAGES, TEST_LABELS)


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


def folder(directory: str) -> Path:
    """`data.dir` as a path, refused when it names a file: the hint to copy the IDX files "into"
    it would make no sense, and a download would fail to write there after fetching."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(
            f"data.dir={directory} is a file, not a folder: point it at the folder holding the "
            f"four IDX files"
        )
    return path


@dataclass(frozen=True)
class _IdxSource:
    directory: Path
    download: bool
    mirrors: list[str]
    sha256: dict[str, str]
    timeout_s: float

    def read(self, images_file: str, labels_file: str) -> tuple[np.ndarray, np.ndarray]:
        files = {name: self.locate(name) for name in (images_file, labels_file)}
        images, labels = (read_idx(path, self.sha256.get(name)) for name, path in files.items())
        where = files[images_file]
        if images.ndim != 3 or labels.ndim != 1:
            raise UserError(
                f"{where}: expected images of shape (N, height, width) and labels of shape "
                f"(N,), found {images.shape} and {labels.shape}"
            )
        if len(images) != len(labels):
            raise UserError(
                f"{where}: {len(images)} images but {len(labels)} labels; the image and label "
                f"files must come from the same release"
            )
        return images, labels

    def locate(self, name: str) -> Path:
        """The file `name` or `name.gz`, downloaded first if allowed and missing."""
        for candidate in (self.directory / name, self.directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        if not self.download:
            raise UserError(
                f"IDX file {name}[.gz] not found in {self.directory.resolve()}: point data.dir "
                f"at the folder holding the IDX files ({_DIR_DEFAULTS}), or set "
                f"data.download=true"
            )
        return download(name, self.directory, self.mirrors, self.sha256.get(name), self.timeout_s)


def download(
    name: str, directory: Path, mirrors: list[str], sha256: str | None, timeout_s: float
) -> Path:
    """Fetch `name.gz` from the first mirror that serves a verified copy; write it atomically."""
    failures = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{name}.gz"
        try:
            log.info("Downloading %s", url)
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                payload = response.read()
            content = _decompress(payload, url)
            parse_idx(content, url)
            check_sha256(payload, content, sha256, url)
        except (OSError, ValueError, http.client.HTTPException, UserError) as error:
            failures.append(f"  {url}: {error}")
            continue
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{name}.gz"
        partial = target.with_suffix(".gz.part")
        partial.write_bytes(payload)
        partial.replace(target)
        return target
    tried = "\n".join(failures) or "  (data.mirrors is empty)"
    raise UserError(
        f"could not download {name}; every mirror failed:\n{tried}\n"
        f"Copy the IDX files into {directory.resolve()}, or point data.dir at them "
        f"({_DIR_DEFAULTS})."
    )


def read_idx(path: Path, sha256: str | None = None) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not), checked for truncation and checksum."""
    raw = path.read_bytes()
    content = _decompress(raw, path)
    array = parse_idx(content, path)
    check_sha256(raw, content, sha256, path)
    return array


def _decompress(raw: bytes, source: object) -> bytes:
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(
            f"{source}: gzip data is corrupt or truncated ({error}); replace the file "
            f"(delete it to download it again)"
        ) from None


def parse_idx(content: bytes, source: object) -> np.ndarray:
    """Decode IDX bytes: 2 zero bytes, type code, rank, big-endian dimensions, unsigned bytes."""
    if len(content) < 4 or content[:2] != b"\0\0" or content[2] != _UBYTE:
        raise UserError(f"{source}: not an IDX file of unsigned bytes (header {content[:4].hex()})")
    rank = content[3]
    header = 4 + 4 * rank
    if len(content) < header:
        raise UserError(f"{source}: truncated inside its header")
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    expected = int(np.prod(shape))
    found = len(content) - header
    if found != expected:
        state = "truncated" if found < expected else "too long"
        raise UserError(
            f"{source}: {state}: its header promises {shape} = {expected} bytes of data, "
            f"the file holds {found}; replace the file (delete it to download it again)"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)


def check_sha256(raw: bytes, content: bytes, sha256: str | None, source: object) -> None:
    """Refuse an IDX file unless its bytes as stored or served (`raw`) or its decompressed
    `content` have the SHA-256 `sha256`: MNIST's checksums are commonly quoted for the
    decompressed files, Fashion-MNIST's for the gzipped ones, and either is accepted."""
    if sha256 is None:
        return
    stored = hashlib.sha256(raw).hexdigest()
    if stored == sha256:
        return
    found = f"SHA-256 is {stored}"
    if raw.startswith(_GZIP_MAGIC):
        decompressed = hashlib.sha256(content).hexdigest()
        if decompressed == sha256:
            return
        found = f"SHA-256 is {stored} as stored (gzipped) and {decompressed} decompressed"
    raise UserError(
        f"{source}: {found}, but data.sha256 expects {sha256}; the file is corrupted or from "
        f"another release: delete it to download it again, or drop the check with ~data.sha256"
    )


def check_batch_fits(n: int, batch_size: int) -> None:
    """A training batch must fit in the training split, which it is drawn from without
    replacement."""
    if batch_size > n:
        raise UserError(
            f"a training batch of {batch_size} examples (data.batch_size times the replicas) "
            f"exceeds the {n} training examples: lower data.batch_size, or raise data.limit"
        )
