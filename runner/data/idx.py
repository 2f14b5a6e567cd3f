"""The loader of IDX files (MNIST, Fashion-MNIST), the `_target_` of data=mnist and
data=fashion_mnist: find or download them, verify them, decode them."""

import functools
import gzip
import hashlib
import http.client
import logging
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner.data import idx_cache
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


def idx_files(
    dir: str,
    *,
    download: bool = False,
    mirrors: list[str] | None = None,
    sha256: dict[str, str] | None = None,
    download_timeout_s: float = 60.0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST's four IDX files (or Fashion-MNIST's, which has the same names and layout) in
    `dir`, gzipped or not, downloaded from `mirrors` if missing and allowed, each checked
    against its `sha256`: the digest of the file as served (gzipped) or of its decompressed
    content, since releases publish one or the other. A gzipped file is decoded once, into a
    cache beside it where its folder may be written (`runner.data.idx_cache`)."""
    source = _IdxSource(folder(dir), download, mirrors or [], sha256 or {}, download_timeout_s)
    return source.read(TRAIN_IMAGES, TRAIN_LABELS), source.read(TEST_IMAGES, TEST_LABELS)


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
        images, labels = (_read(path, self.sha256.get(name)) for name, path in files.items())
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
        return download(
            name,
            self.directory,
            mirrors=self.mirrors,
            sha256=self.sha256.get(name),
            timeout_s=self.timeout_s,
        )


def download(
    name: str, directory: Path, *, mirrors: list[str], sha256: str | None, timeout_s: float
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
    raw, content, array = _decode(path)
    check_sha256(raw, content, sha256, path)
    return array


def _decode(path: Path) -> tuple[bytes, bytes, np.ndarray]:
    """An IDX file's bytes as stored, decompressed, and decoded."""
    raw = path.read_bytes()
    content = _decompress(raw, path)
    return raw, content, parse_idx(content, path)


def _read(path: Path, sha256: str | None) -> np.ndarray:
    """`read_idx`, once a process while the file is unchanged: the trials of a search that one
    process runs one after another (the basic launcher's, a joblib worker's) read their data
    once. The array is read-only, as they share it."""
    stat = path.stat()
    return _read_unchanged(path.resolve(), stat.st_size, stat.st_mtime_ns, sha256)


@functools.lru_cache(maxsize=8)  # two data sets' four files
def _read_unchanged(path: Path, size: int, mtime_ns: int, sha256: str | None) -> np.ndarray:
    array = _read_afresh(path, sha256)
    array.flags.writeable = False
    idx_cache.remember(array)  # hashed once, where no cache beside the file told its digest
    return array


def _read_afresh(path: Path, sha256: str | None) -> np.ndarray:
    """`read_idx`, through the cache of a gzipped file's array (`runner.data.idx_cache`), whose
    digests stand for those of the file it is valid for."""
    if path.suffix != ".gz":
        return read_idx(path, sha256)
    cached = idx_cache.load(path)
    if cached is not None:
        array, digests = cached
        _check_digests(digests.stored, digests.decompressed, sha256, path)
        return array
    before = path.stat()  # a change while it is read then makes the cache stale
    raw, content, array = _decode(path)
    check_sha256(raw, content, sha256, path)
    if raw.startswith(_GZIP_MAGIC):
        idx_cache.keep(path, before, array, raw=raw, content=content)
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
    gzipped = stored != sha256 and raw.startswith(_GZIP_MAGIC)
    decompressed = hashlib.sha256(content).hexdigest() if gzipped else None
    _check_digests(stored, decompressed, sha256, source)


def _check_digests(
    stored: str, decompressed: str | None, sha256: str | None, source: object
) -> None:
    """`check_sha256` on the file's digests as `stored` and, if gzipped, `decompressed`."""
    if sha256 is None or sha256 in (stored, decompressed):
        return
    found = f"SHA-256 is {stored}"
    if decompressed is not None:
        found = f"SHA-256 is {stored} as stored (gzipped) and {decompressed} decompressed"
    raise UserError(
        f"{source}: {found}, but data.sha256 expects {sha256}; the file is corrupted or from "
        f"another release: delete it to download it again, or drop the check with ~data.sha256"
    )
