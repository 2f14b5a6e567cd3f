"""Gzipped IDX files decoded once: the array of `NAME.gz` is kept beside it in `NAME.gz.npz`, so
that later starts read it instead of decompressing and hashing the file again (MNIST's: about
0.3 s of a run's start).

A cache is used only whole and only while its source has the size and modification time it
records; else the file is decoded anew and the cache rewritten. It records the source's SHA-256
(as stored and decompressed), which `data.sha256` is checked against as the file's would be,
and the array's, the digest the run records (`array_sha256`). A .npz is a zip file, whose
CRC-32 catches a damaged array. It is written atomically, a temporary file renamed, and only
into a folder whose permissions grant writing: a read-only data folder gets no cache, and
nothing is said.
"""

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import weakref
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SUFFIX = ".npz"
# What a cache holds; a cache of another format is rewritten.
_FORMAT = 1
# What reading a damaged cache raises, by NumPy's, zipfile's or json's hand, or by its record's
# holding other than it should.
_UNREADABLE = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    EOFError,
    zipfile.BadZipFile,
)


@dataclass(frozen=True)
class Digests:
    """SHA-256 digests: of the source file as stored (gzipped), of its content decompressed,
    and of the decoded array's bytes."""

    stored: str
    decompressed: str
    array: str


def cache_path(source: Path) -> Path:
    """Where the array decoded from `source` is kept."""
    return source.with_name(source.name + SUFFIX)


def load(source: Path) -> tuple[np.ndarray, Digests] | None:
    """The array cached for `source`, read-only, and its digests; None unless a whole cache
    written from `source` as it is now exists."""
    try:
        now = source.stat()
        # Opened here: NumPy (2.4) leaves open a file it opened that is no whole zip file.
        with cache_path(source).open("rb") as file, np.load(file, allow_pickle=False) as stored:
            record = json.loads(stored["record"].item())
            if record.get("format") != _FORMAT or record.get("source") != _identity(now):
                return None
            digests = Digests(**record["sha256"])
            array = stored["array"]  # read whole, its CRC-32 checked
    except FileNotFoundError:
        return None
    except _UNREADABLE as error:
        log.debug("%s: cache not used (%s)", cache_path(source), error)
        return None
    array.flags.writeable = False
    _remember(array, digests.array)
    return array, digests


def keep(
    source: Path, before: os.stat_result, array: np.ndarray, *, raw: bytes, content: bytes
) -> None:
    """Cache `array`, decoded from `source`'s bytes `raw` (decompressed: `content`), which had
    the status `before` when it was read; nothing if its folder is not to be written or the
    write fails."""
    folder = source.parent
    if not _writable(folder):
        return
    digests = Digests(_sha256(raw), _sha256(content), _sha256(array.tobytes()))
    _remember(array, digests.array)
    record = {"format": _FORMAT, "source": _identity(before), "sha256": asdict(digests)}
    target = cache_path(source)
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, array=array, record=np.array(json.dumps(record)))
            os.chmod(temporary, before.st_mode & 0o666)  # readable by whoever reads the source
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    except OSError as error:
        log.debug("%s: cache not written (%s)", target, error)


def _identity(status: os.stat_result) -> list[int]:
    """What tells a changed source from the one a cache was written from, without reading it."""
    return [status.st_size, status.st_mtime_ns]


def _writable(folder: Path) -> bool:
    """Whether a cache may be written into `folder`: its permissions must grant writing to
    someone, as root may write where they grant it to no one (a folder made read-only on
    purpose), and to this process."""
    try:
        granted = folder.stat().st_mode & 0o222
    except OSError:
        return False
    return bool(granted) and os.access(folder, os.W_OK)


# The digests of the arrays this module read or wrote, by id, while they live: read-only, their
# bytes keep the digest, which a run then need not compute again.
_known: dict[int, str] = {}


def remember(array: np.ndarray) -> None:
    """Know the digest of the read-only `array` from now on: an array a process keeps and hands
    to each of its runs, which then need not hash it again."""
    _remember(array, array_sha256(array))


def _remember(array: np.ndarray, digest: str) -> None:
    if array.flags.writeable:  # its bytes, and so its digest, could change
        return
    _known[id(array)] = digest
    weakref.finalize(array, _known.pop, id(array), None)


def array_sha256(array: np.ndarray) -> str:
    """The SHA-256 of an array's bytes in C order, the digest a run records of each data array:
    known already for an array read from a cache or written to one."""
    known = _known.get(id(array))
    return known if known is not None else _sha256(np.ascontiguousarray(array).tobytes())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
