"""MNIST from its standard IDX files: find or download them, verify them, split them, batch them."""

import gzip
import hashlib
import http.client
import logging
import urllib.request
import zlib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Split:
    """Images flattened to 784 floats in [0, 1], and their integer labels."""

    x: np.ndarray
    y: np.ndarray

    def head(self, n: int | None) -> "Split":
        return self if n is None else Split(self.x[:n], self.y[:n])


@dataclass(frozen=True)
class Splits:
    train: Split
    validation: Split
    test: Split
    files: dict[str, Path]  # each IDX file read, by its name without .gz


def load_mnist(cfg: Any) -> Splits:
    """The tutorials' split: the first `validation_size` training images validate, the rest train.

    Pixels are scaled to [0, 1]; `limit` keeps the first examples of each split.
    """
    train_all, train_files = _read_split(cfg, TRAIN_IMAGES, TRAIN_LABELS)
    test, test_files = _read_split(cfg, TEST_IMAGES, TEST_LABELS)
    n_val = cfg.validation_size
    if not 0 < n_val < len(train_all.y):
        raise UserError(
            f"data.validation_size={n_val} must be between 1 and {len(train_all.y) - 1}, "
            f"the training images found"
        )
    return Splits(
        train=Split(train_all.x[n_val:], train_all.y[n_val:]).head(cfg.limit),
        validation=train_all.head(n_val).head(cfg.limit),
        test=test.head(cfg.limit),
        files={**train_files, **test_files},
    )


def load_test(cfg: Any) -> Split:
    """Only the 10,000 test images (the first `limit` of them), for evaluating a trained model."""
    return _read_split(cfg, TEST_IMAGES, TEST_LABELS)[0].head(cfg.limit)


def folder(cfg: Any) -> Path:
    """`data.dir` as a path, refused when it names a file: the hint to copy the IDX files "into"
    it would make no sense, and a download would fail to write there after fetching."""
    directory = Path(cfg.dir).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(
            f"data.dir={cfg.dir} is a file, not a folder: point it at the folder holding the "
            f"four IDX files"
        )
    return directory


def _read_split(cfg: Any, images_file: str, labels_file: str) -> tuple[Split, dict[str, Path]]:
    directory = folder(cfg)
    files = {name: locate(directory, name, cfg) for name in (images_file, labels_file)}
    images, labels = (read_idx(path, cfg.sha256.get(name)) for name, path in files.items())
    where = files[images_file]
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(
            f"{where}: expected images of shape (N, 28, 28) and labels of shape (N,), "
            f"found {images.shape} and {labels.shape}"
        )
    if len(images) != len(labels):
        raise UserError(
            f"{where}: {len(images)} images but {len(labels)} labels; the image and label "
            f"files must come from the same release"
        )
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return Split(x, labels.astype(np.int32)), files


def locate(directory: Path, name: str, cfg: Any) -> Path:
    """The file `name` or `name.gz` in `directory`, downloaded first if allowed and missing."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    if not cfg.download:
        raise UserError(
            f"MNIST file {name}[.gz] not found in {directory.resolve()}: point data.dir "
            f"(or MNIST_DIR) at the folder holding the IDX files, or set data.download=true"
        )
    return download(name, directory, cfg.mirrors, cfg.sha256.get(name), cfg.download_timeout_s)


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
            parse_idx(_decompress(payload, url), sha256, url)
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
        f"Copy the MNIST IDX files into {directory.resolve()}, "
        f"or point data.dir (or MNIST_DIR) at them."
    )


def read_idx(path: Path, sha256: str | None = None) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not), checked for truncation and checksum."""
    return parse_idx(_decompress(path.read_bytes(), path), sha256, path)


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


def parse_idx(content: bytes, sha256: str | None, source: object) -> np.ndarray:
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
    if sha256 is not None:
        digest = hashlib.sha256(content).hexdigest()
        if digest != sha256:
            raise UserError(
                f"{source}: SHA-256 of the decompressed content is {digest}, expected {sha256}; "
                f"the file is corrupted or not the MNIST release (delete it to download it again)"
            )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)


def training_dataset(split: Split, batch_size: int, seed: int, start_step: int = 0) -> Any:
    """Endless batches in a seeded order, reshuffled every epoch, prefetched behind training;
    `start_step` skips the batches a resumed run has already trained on.

    Shuffling indices and gathering whole batches costs one op per batch instead of one per
    example, which keeps the input pipeline off the critical path even for the softmax model.
    """
    import tensorflow as tf

    x, y = tf.constant(split.x), tf.constant(split.y)
    return (
        batch_indices(len(split.y), batch_size, seed)
        .skip(start_step)
        .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
        .prefetch(tf.data.AUTOTUNE)
    )


def in_batches(split: Split, batch_size: int, labels: bool = True) -> Any:
    """`split` in order, in batches, for Keras's `evaluate` and `predict`. Keras's own pipeline
    for arrays maps in parallel, which under op determinism makes TensorFlow 2.21 print a
    spurious ERROR line ("NodeDef mentions attribute use_unbounded_threadpool")."""
    import tensorflow as tf

    examples = (split.x, split.y) if labels else split.x
    return tf.data.Dataset.from_tensor_slices(examples).batch(batch_size)


def batch_indices(n: int, batch_size: int, seed: int) -> Any:
    """The example indices of each training batch, in training order: the same `seed` replays
    the same sequence, so a callback can tell which examples a given step trained on."""
    import tensorflow as tf

    if batch_size > n:
        raise UserError(
            f"a training batch of {batch_size} examples (data.batch_size times the replicas) "
            f"exceeds the {n} training examples: lower data.batch_size, or raise data.limit"
        )
    return (
        tf.data.Dataset.range(n)
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
    )
