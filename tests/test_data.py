"""Tests for runner.data: the IDX loader, its checks, the mirror download, data=fashion_mnist
and each backend's batch pipeline.

The real MNIST files come from MNIST_DIR (default: ../shared/data/mnist beside the repo root).
Downloads are exercised against an HTTP server on 127.0.0.1 that the tests start themselves;
nothing here touches the internet.
"""

import functools
import gzip
import hashlib
import http.client
import http.server
import logging
import os
import re
import socket
import threading
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from runner import backends
from runner.cli.train import compose, train
from runner.config.schema import DataKeys
from runner.config.settings import runner_keys
from runner.data import (
    ARRAYS,
    FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    Split,
    check_sha256,
    download,
    idx,
    idx_cache,
    parse_idx,
    read_idx,
)
from runner.data import load as load_data
from runner.errors import UserError

from .conftest import QUICK, cli, only_run, store_client

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_data")

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_YAML = REPO_ROOT / "conf" / "data" / "mnist.yaml"
FASHION_YAML = REPO_ROOT / "conf" / "data" / "fashion_mnist.yaml"
# The SHA-256 of Fashion-MNIST's four .gz files, as its authors publish them.
FASHION_SHA256 = {
    TRAIN_IMAGES: "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
    TRAIN_LABELS: "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
    TEST_IMAGES: "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
    TEST_LABELS: "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
}


def load(option):
    """The splits of the data option `option`, with the runner's keys it holds."""
    return load_data(option, runner_keys(option, DataKeys, "data"))


def data_cfg(directory: Path, **overrides):
    """conf/data/mnist.yaml as a DictConfig, with `dir` set explicitly and `overrides` applied."""
    cfg = OmegaConf.load(MNIST_YAML)
    cfg.dir = str(directory)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def idx_bytes(array: np.ndarray) -> bytes:
    """`array` (uint8) encoded as an IDX file of unsigned bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = b"\0\0\x08" + bytes([array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def fake_mnist_contents(n_train: int = 20, n_test: int = 10, n_train_labels: int | None = None):
    """Decompressed IDX content of a tiny MNIST lookalike, by file name."""
    rng = np.random.default_rng(0)
    n_train_labels = n_train if n_train_labels is None else n_train_labels
    return {
        TRAIN_IMAGES: idx_bytes(rng.integers(0, 256, (n_train, 28, 28))),
        TRAIN_LABELS: idx_bytes(np.arange(n_train_labels) % 10),
        TEST_IMAGES: idx_bytes(rng.integers(0, 256, (n_test, 28, 28))),
        TEST_LABELS: idx_bytes((np.arange(n_test) + 3) % 10),
    }


def write_fake_mnist(directory: Path, contents: dict[str, bytes], compress: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / name).write_bytes(content)
    return directory


def closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port was just bound and released, so connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --------------------------------------------------------------------------- real MNIST files


@pytest.fixture(scope="module")
def real_splits(mnist_dir):
    return load(data_cfg(mnist_dir, download=False))


def test_real_split_sizes_and_pixels(real_splits):
    for split, n in (
        (real_splits.train, 55000),
        (real_splits.validation, 5000),
        (real_splits.test, 10000),
    ):
        assert split.x.shape == (n, 28, 28, 1)
        assert split.x.dtype == np.float32
        assert split.y.shape == (n,)
        assert split.x.min() == 0.0
        assert split.x.max() == 1.0
        assert set(np.unique(split.y)) == set(range(10))


def test_real_validation_is_first_training_images(real_splits, mnist_dir):
    np.testing.assert_array_equal(real_splits.validation.y[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    # The training split continues where validation stops: image 5000 onwards.
    raw = read_idx(mnist_dir / f"{TRAIN_LABELS}.gz")
    np.testing.assert_array_equal(real_splits.train.y, raw[5000:])
    np.testing.assert_array_equal(real_splits.validation.y, raw[:5000])


def test_real_training_statistics(real_splits):
    y = np.concatenate([real_splits.validation.y, real_splits.train.y])
    x = np.concatenate([real_splits.validation.x, real_splits.train.x])
    assert len(y) == 60000
    assert np.sum(y == 0) == 5923
    assert np.sum(y == 1) == 6742
    assert float(x.mean(dtype=np.float64)) == pytest.approx(33.318 / 255, abs=1e-3)


def test_real_limit_keeps_first_examples(real_splits, mnist_dir):
    limited = load(data_cfg(mnist_dir, download=False, limit=7))
    for name in ("train", "validation", "test"):
        full, small = getattr(real_splits, name), getattr(limited, name)
        assert small.x.shape == (7, 28, 28, 1)
        np.testing.assert_array_equal(small.x, full.x[:7])
        np.testing.assert_array_equal(small.y, full.y[:7])


def test_real_files_match_configured_checksums(mnist_dir):
    cfg = data_cfg(mnist_dir)
    path = mnist_dir / f"{TEST_LABELS}.gz"
    labels = read_idx(path, cfg.sha256[TEST_LABELS])
    assert labels.shape == (10000,)
    with pytest.raises(UserError, match="SHA-256"):
        read_idx(path, cfg.sha256[TRAIN_LABELS])


# --------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_roundtrip(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    content = idx_bytes(images)
    path = tmp_path / ("images.gz" if compress else "images")
    path.write_bytes(gzip.compress(content) if compress else content)

    result = read_idx(path, sha256(content))  # the checksum of the decompressed content

    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, images)
    # ... or of the file as stored, gzipped or not.
    np.testing.assert_array_equal(read_idx(path, sha256(path.read_bytes())), images)


def test_parse_idx_labels():
    labels = np.array([7, 2, 1, 0, 4], dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels), "labels"), labels)


def test_read_idx_truncated_file(tmp_path):
    content = idx_bytes(np.ones((2, 3, 3), dtype=np.uint8))[:-8]  # promises 18 bytes, holds 10
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"short-idx3-ubyte.*truncated") as info:
        read_idx(path)
    assert "18" in str(info.value) and "10" in str(info.value)


def test_read_idx_truncated_inside_header(tmp_path):
    path = tmp_path / "stub-idx3-ubyte"
    path.write_bytes(b"\0\0\x08\x03\0\0\0\x02")  # rank 3 needs 12 bytes of dimensions
    with pytest.raises(UserError, match=r"stub-idx3-ubyte.*truncated"):
        read_idx(path)


def test_read_idx_too_long(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\0")
    with pytest.raises(UserError, match=r"long-idx1-ubyte.*too long"):
        read_idx(path)


def test_read_idx_not_idx(tmp_path):
    path = tmp_path / "page.html"
    path.write_bytes(b"<html>Not Found</html>")
    with pytest.raises(UserError, match=r"page\.html.*not an IDX file"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "cut-idx1-ubyte.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(UserError, match=r"cut-idx1-ubyte\.gz.*gzip data is corrupt or truncated"):
        read_idx(path)


def test_read_idx_garbage_gzip_body(tmp_path):
    header = gzip.compress(b"")[:10]  # a valid gzip member header
    body = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    path = tmp_path / "noise-idx1-ubyte.gz"
    path.write_bytes(header + body)
    with pytest.raises(UserError, match=r"noise-idx1-ubyte\.gz.*gzip data is corrupt"):
        read_idx(path)


def test_read_idx_checksum_mismatch(tmp_path):
    content = idx_bytes(np.arange(10, dtype=np.uint8))
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(content))
    wrong = sha256(content + b"x")
    with pytest.raises(UserError) as info:
        read_idx(path, wrong)
    assert str(info.value) == (
        f"{path}: SHA-256 is {sha256(path.read_bytes())} as stored (gzipped) and "
        f"{sha256(content)} decompressed, but data.sha256 expects {wrong}; the file is corrupted "
        f"or from another release: delete it to download it again, or drop the check with "
        f"~data.sha256"
    )


def test_read_idx_checksum_mismatch_uncompressed(tmp_path):
    content = idx_bytes(np.arange(10, dtype=np.uint8))
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(content)
    wrong = sha256(b"x")
    with pytest.raises(UserError) as info:
        read_idx(path, wrong)
    message = str(info.value)
    assert message.startswith(f"{path}: SHA-256 is {sha256(content)}, but data.sha256 expects ")
    assert "decompressed" not in message and "\n" not in message


def test_check_sha256_takes_either_digest():
    content = idx_bytes(np.arange(10, dtype=np.uint8))
    raw = gzip.compress(content)
    for digest in (None, sha256(raw), sha256(content)):
        check_sha256(raw, content, digest, "labels")  # no error
    with pytest.raises(UserError, match=r"^labels: SHA-256 is "):
        check_sha256(raw, content, sha256(b""), "labels")


# --------------------------------------------------------------------------- load, fake data


def fake_cfg(directory: Path, **overrides):
    settings = {"sha256": {}, "validation_size": 5, "download": False} | overrides
    return data_cfg(directory, **settings)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_load_fake_mnist(tmp_path, compress):
    contents = fake_mnist_contents()
    directory = write_fake_mnist(tmp_path / "mnist", contents, compress=compress)

    splits = load(fake_cfg(directory))

    images = parse_idx(contents[TRAIN_IMAGES], "x").reshape(20, 28, 28, 1) / np.float32(255)
    labels = np.arange(20) % 10
    assert splits.validation.x.shape == (5, 28, 28, 1)
    assert splits.train.x.shape == (15, 28, 28, 1)
    assert splits.test.x.shape == (10, 28, 28, 1)
    assert splits.num_classes == 10
    assert splits.train.y.dtype == np.int32
    np.testing.assert_allclose(splits.validation.x, images[:5])
    np.testing.assert_allclose(splits.train.x, images[5:])
    np.testing.assert_array_equal(splits.validation.y, labels[:5])
    np.testing.assert_array_equal(splits.train.y, labels[5:])
    np.testing.assert_array_equal(splits.test.y, (np.arange(10) + 3) % 10)


def test_load_checks_checksums(tmp_path):
    contents = fake_mnist_contents()
    directory = write_fake_mnist(tmp_path / "mnist", contents)
    good = {name: sha256(content) for name, content in contents.items()}
    assert load(data_cfg(directory, sha256=good, validation_size=5, download=False))

    bad = dict(good, **{TEST_IMAGES: sha256(b"something else")})
    with pytest.raises(UserError, match=rf"{TEST_IMAGES}\.gz.*SHA-256"):
        load(data_cfg(directory, sha256=bad, validation_size=5, download=False))


def test_load_image_label_count_mismatch(tmp_path):
    directory = write_fake_mnist(tmp_path / "mnist", fake_mnist_contents(n_train_labels=19))
    with pytest.raises(UserError, match=rf"{TRAIN_IMAGES}.*20 images but 19 labels"):
        load(fake_cfg(directory))


@pytest.mark.parametrize("validation_size", [0, 20, 25])
def test_load_validation_size_out_of_range(tmp_path, validation_size):
    directory = write_fake_mnist(tmp_path / "mnist", fake_mnist_contents())
    with pytest.raises(UserError, match=r"data\.validation_size=.* between 1 and 19"):
        load(fake_cfg(directory, validation_size=validation_size))


def test_load_wrong_rank(tmp_path):
    contents = fake_mnist_contents()
    contents[TEST_IMAGES] = idx_bytes(np.zeros((10, 784), dtype=np.uint8))
    directory = write_fake_mnist(tmp_path / "mnist", contents)
    with pytest.raises(UserError, match=rf"{TEST_IMAGES}.*\(N, height, width\)"):
        load(fake_cfg(directory))


def test_load_limit_on_fake(tmp_path):
    directory = write_fake_mnist(tmp_path / "mnist", fake_mnist_contents())
    splits = load(fake_cfg(directory, limit=3))
    np.testing.assert_array_equal(splits.validation.y, [0, 1, 2])
    np.testing.assert_array_equal(splits.train.y, [5, 6, 7])
    np.testing.assert_array_equal(splits.test.y, [3, 4, 5])


def test_load_missing_file_without_download(tmp_path):
    contents = fake_mnist_contents()
    del contents[TEST_LABELS]
    directory = write_fake_mnist(tmp_path / "mnist", contents)
    with pytest.raises(UserError, match=re.escape(TEST_LABELS)) as info:
        load(fake_cfg(directory))
    message = str(info.value)
    assert str(directory.resolve()) in message
    assert "data.dir" in message
    assert "MNIST_DIR" in message
    assert not (directory / f"{TEST_LABELS}.gz").exists()


def not_a_folder_message(path: Path) -> str:
    return (
        f"data.dir={path} is a file, not a folder: point it at the folder holding the four IDX "
        f"files"
    )


def test_load_refuses_a_data_dir_that_is_a_file(tmp_path):
    archive = tmp_path / "mnist.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(UserError) as info:
        load(fake_cfg(archive))
    assert str(info.value) == not_a_folder_message(archive)
    assert archive.read_bytes() == b"PK"


def test_load_refuses_a_data_dir_that_is_a_file_before_downloading(serve, tmp_path):
    url, root = serve()
    contents = fake_mnist_contents()
    write_fake_mnist(root, contents)
    archive = tmp_path / "mnist.zip"
    archive.write_bytes(b"PK")
    cfg = fake_cfg(
        archive,
        download=True,
        download_timeout_s=5,
        mirrors=[url],
        sha256={name: sha256(content) for name, content in contents.items()},
    )
    with pytest.raises(UserError) as info:
        load(cfg)
    assert str(info.value) == not_a_folder_message(archive)
    assert list(tmp_path.iterdir()) == [archive]  # nothing downloaded beside it


def test_runner_refuses_a_data_dir_that_is_a_file_before_any_run(tmp_path, mnist_dir):
    archive = tmp_path / "mnist.zip"
    archive.write_bytes(b"PK")
    result = cli(
        "runner",
        f"data.dir={archive}",
        "data.download=false",
        cwd=tmp_path,
        mnist_dir=mnist_dir,
        new_store=False,
    )
    assert result.returncode == 1
    assert result.stderr == f"runner: error: {not_a_folder_message(archive)}\n"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_load_missing_folder_without_download(tmp_path):
    with pytest.raises(UserError, match=rf"{TRAIN_IMAGES}.*not found.*data\.dir.*MNIST_DIR"):
        load(fake_cfg(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- decoded files' cache


@pytest.fixture(autouse=True)
def read_anew(monkeypatch):
    """Each load reads the files (or the caches beside them), not what this process read of
    them before (`idx._read`), but where a test asks for that."""
    unchanged = idx._read_unchanged.__wrapped__
    monkeypatch.setattr(idx, "_read_unchanged", functools.lru_cache(maxsize=0)(unchanged))


def test_a_process_reads_an_unchanged_file_once(tmp_path, monkeypatch):
    """As a search's trials in one process do: the same arrays, read-only, until a file
    changes."""
    monkeypatch.setattr(
        idx, "_read_unchanged", functools.lru_cache(8)(idx._read_unchanged.__wrapped__)
    )
    directory = write_fake_mnist(tmp_path / "mnist", fake_mnist_contents(), compress=False)
    first = idx.idx_files(directory)
    second = idx.idx_files(directory)
    assert all(a is b for a, b in zip(sum(first, ()), sum(second, ()), strict=True))
    assert not any(array.flags.writeable for array in sum(first, ()))
    digests = [idx_cache.array_sha256(array) for array in sum(first, ())]
    with monkeypatch.context() as patch:
        patch.setattr(idx_cache, "_sha256", lambda data: pytest.fail("hashed again"))
        assert [idx_cache.array_sha256(array) for array in sum(second, ())] == digests
    path = directory / TEST_LABELS
    path.write_bytes(idx_bytes(np.full(10, 7, np.uint8)))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    (_, _), (_, labels) = idx.idx_files(directory)
    np.testing.assert_array_equal(labels, np.full(10, 7))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


GZIPPED = sorted(f"{name}.gz" for name in FILES)
CACHED = sorted([*GZIPPED, *(f"{name}.gz.npz" for name in FILES)])


@pytest.fixture
def no_decoding(monkeypatch):
    """Makes decoding an IDX file fail: what loads then came from the caches."""

    def refused(path):
        raise AssertionError(f"{path} decoded")

    monkeypatch.setattr(idx, "_decode", refused)


def test_gzipped_files_are_decoded_once_into_a_cache_beside_them(tmp_path, request):
    contents = fake_mnist_contents()
    directory = write_fake_mnist(tmp_path / "mnist", contents)
    good = {name: sha256(content) for name, content in contents.items()}

    first = load(fake_cfg(directory, sha256=good))
    assert listing(directory) == CACHED
    request.getfixturevalue("no_decoding")
    again = load(fake_cfg(directory, sha256=good))

    # The digests a run records are those of the decoded arrays, whichever way they were read.
    arrays = dict(zip(ARRAYS, (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS), strict=True))
    decoded = {
        key: sha256(parse_idx(contents[name], name).tobytes()) for key, name in arrays.items()
    }
    assert first.digests == again.digests == decoded
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(again, split).x, getattr(first, split).x)
        np.testing.assert_array_equal(getattr(again, split).y, getattr(first, split).y)


def test_a_cached_file_is_checked_against_data_sha256_as_the_file_is(tmp_path):
    contents = fake_mnist_contents()
    directory = write_fake_mnist(tmp_path / "mnist", contents)
    bad = {name: sha256(content) for name, content in contents.items()}
    bad[TEST_IMAGES] = sha256(b"something else")
    load(fake_cfg(directory))
    assert listing(directory) == CACHED

    with pytest.raises(UserError) as from_cache:
        load(fake_cfg(directory, sha256=bad))
    for name in FILES:
        (directory / f"{name}.gz.npz").unlink()
    with pytest.raises(UserError) as from_file:
        load(fake_cfg(directory, sha256=bad))

    assert str(from_cache.value) == str(from_file.value)
    assert str(from_file.value).startswith(f"{directory / TEST_IMAGES}.gz: SHA-256 is ")


def test_a_changed_file_is_decoded_anew_and_its_cache_rewritten(tmp_path, request):
    directory = write_fake_mnist(tmp_path / "mnist", fake_mnist_contents())
    path = directory / f"{TEST_LABELS}.gz"
    # Stored uncompressed in the gzip stream, so that new labels keep the file's size.
    path.write_bytes(gzip.compress(idx_bytes(np.arange(10)), compresslevel=0))
    np.testing.assert_array_equal(load(fake_cfg(directory)).test.y, np.arange(10))
    before = path.stat()
    path.write_bytes(gzip.compress(idx_bytes(np.full(10, 7)), compresslevel=0))
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))

    np.testing.assert_array_equal(load(fake_cfg(directory)).test.y, np.full(10, 7))
    request.getfixturevalue("no_decoding")
    np.testing.assert_array_equal(load(fake_cfg(directory)).test.y, np.full(10, 7))


def flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2  # in the array's bytes
    return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]


@pytest.mark.parametrize(
    "damage",
    [lambda data: data[: len(data) // 2], flip_a_byte, lambda data: b"", lambda data: b"x" * 99],
    ids=["truncated", "flipped", "empty", "not-npz"],
)
def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path, request, damage):
    contents = fake_mnist_contents()
    directory = write_fake_mnist(tmp_path / "mnist", contents)
    first = load(fake_cfg(directory))
    cache = directory / f"{TRAIN_IMAGES}.gz.npz"
    cache.write_bytes(damage(cache.read_bytes()))

    again = load(fake_cfg(directory))
    np.testing.assert_array_equal(again.train.x, first.train.x)
    assert again.digests == first.digests
    request.getfixturevalue("no_decoding")
    np.testing.assert_array_equal(load(fake_cfg(directory)).train.x, first.train.x)


def test_no_cache_where_the_folder_may_not_be_written(tmp_path, caplog):
    """Not even for root, whom the system lets write into a folder made read-only."""
    contents = fake_mnist_contents()
    directory = write_fake_mnist(tmp_path / "mnist", contents)
    directory.chmod(0o555)
    try:
        with caplog.at_level(logging.INFO):
            splits = load(fake_cfg(directory))
    finally:
        directory.chmod(0o755)
    assert listing(directory) == GZIPPED
    assert caplog.records == []
    assert splits.digests["x_test"] == sha256(parse_idx(contents[TEST_IMAGES], "x").tobytes())


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_write_cut_short_leaves_no_cache(tmp_path, monkeypatch, error):
    directory = write_fake_mnist(tmp_path / "mnist", fake_mnist_contents())

    def cut_short(file, **arrays):
        file.write(b"PK\x03\x04")  # the start of a zip file
        raise error

    monkeypatch.setattr(np, "savez", cut_short)
    if isinstance(error, OSError):  # the run goes on without a cache, saying nothing
        assert len(load(fake_cfg(directory)).test.y) == 10
    else:
        with pytest.raises(KeyboardInterrupt):
            load(fake_cfg(directory))
    assert listing(directory) == GZIPPED


# --------------------------------------------------------------------------- downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class _DropsConnectionHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends a few, and hangs up: a mirror failing mid-transfer."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b\x08\x00partial")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format, *args):
        pass


def _start_server(request, handler) -> str:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    request.addfinalizer(stop)
    return f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture
def serve(request, tmp_path_factory):
    """serve(): a fresh folder served over HTTP on 127.0.0.1, as (base URL, folder)."""

    def start() -> tuple[str, Path]:
        root = tmp_path_factory.mktemp("mirror")
        handler = functools.partial(_QuietHandler, directory=str(root))
        return _start_server(request, handler), root

    return start


def test_download_good_file(serve, tmp_path):
    url, root = serve()
    content = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    (root / "tiny-idx2-ubyte.gz").write_bytes(gzip.compress(content))
    target_dir = tmp_path / "new" / "folder"  # created on demand

    path = download(
        "tiny-idx2-ubyte", target_dir, mirrors=[url], sha256=sha256(content), timeout_s=5
    )

    assert path == target_dir / "tiny-idx2-ubyte.gz"
    assert path.read_bytes() == (root / "tiny-idx2-ubyte.gz").read_bytes()
    np.testing.assert_array_equal(read_idx(path, sha256(content)), np.arange(12).reshape(3, 4))
    assert sorted(p.name for p in target_dir.iterdir()) == ["tiny-idx2-ubyte.gz"]


def test_download_refuses_corrupted_copy(serve, tmp_path):
    url, root = serve()
    content = idx_bytes(np.arange(12, dtype=np.uint8))
    tampered = idx_bytes(np.arange(1, 13, dtype=np.uint8))
    (root / "tiny-idx1-ubyte.gz").write_bytes(gzip.compress(tampered))

    with pytest.raises(UserError, match=r"could not download tiny-idx1-ubyte") as info:
        download("tiny-idx1-ubyte", tmp_path, mirrors=[url], sha256=sha256(content), timeout_s=5)

    message = str(info.value)
    assert f"{url}tiny-idx1-ubyte.gz" in message
    assert "SHA-256" in message
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a .part file


def test_download_refuses_truncated_gzip(serve, tmp_path):
    url, root = serve()
    compressed = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    (root / "tiny-idx1-ubyte.gz").write_bytes(compressed[:-20])
    with pytest.raises(UserError, match=r"tiny-idx1-ubyte\.gz.*corrupt or truncated"):
        download("tiny-idx1-ubyte", tmp_path, mirrors=[url], sha256=None, timeout_s=5)
    assert list(tmp_path.iterdir()) == []


def test_download_falls_through_unreachable_and_bad_mirrors(serve, tmp_path):
    content = idx_bytes(np.arange(6, dtype=np.uint8))
    bad_url, bad_root = serve()
    (bad_root / "tiny-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01garbage"))
    empty_url, _ = serve()  # answers 404
    good_url, good_root = serve()
    (good_root / "tiny-idx1-ubyte.gz").write_bytes(gzip.compress(content))
    mirrors = [closed_port_url(), bad_url, empty_url, good_url]

    path = download(
        "tiny-idx1-ubyte", tmp_path, mirrors=mirrors, sha256=sha256(content), timeout_s=5
    )

    np.testing.assert_array_equal(read_idx(path, sha256(content)), np.arange(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-idx1-ubyte.gz"]


def test_download_checks_the_digest_of_the_file_as_served(serve, tmp_path):
    # Fashion-MNIST publishes the SHA-256 of its .gz files; MNIST's config lists decompressed ones.
    url, root = serve()
    served = gzip.compress(idx_bytes(np.arange(6, dtype=np.uint8)))
    (root / "tiny-idx1-ubyte.gz").write_bytes(served)

    path = download(
        "tiny-idx1-ubyte", tmp_path / "ok", mirrors=[url], sha256=sha256(served), timeout_s=5
    )
    assert path.read_bytes() == served

    wrong = sha256(served + b"x")
    with pytest.raises(UserError, match=r"could not download tiny-idx1-ubyte") as info:
        download("tiny-idx1-ubyte", tmp_path / "refused", mirrors=[url], sha256=wrong, timeout_s=5)
    assert f"{url}tiny-idx1-ubyte.gz: SHA-256 is {sha256(served)} as stored" in str(info.value)
    assert not (tmp_path / "refused").exists()


def test_download_accepts_uncompressed_payload(serve, tmp_path):
    # A mirror may serve the decompressed file under the .gz name; it still verifies and loads.
    url, root = serve()
    content = idx_bytes(np.arange(6, dtype=np.uint8))
    (root / "tiny-idx1-ubyte.gz").write_bytes(content)
    path = download("tiny-idx1-ubyte", tmp_path, mirrors=[url], sha256=sha256(content), timeout_s=5)
    np.testing.assert_array_equal(read_idx(path, sha256(content)), np.arange(6))


def test_download_all_mirrors_fail(serve, tmp_path):
    refused = closed_port_url()
    missing_url, _ = serve()  # answers 404
    corrupt_url, corrupt_root = serve()
    (corrupt_root / "tiny-idx1-ubyte.gz").write_bytes(gzip.compress(b"not idx at all"))
    mirrors = [refused, missing_url, corrupt_url]

    with pytest.raises(UserError, match=r"every mirror failed") as info:
        download("tiny-idx1-ubyte", tmp_path / "out", mirrors=mirrors, sha256=None, timeout_s=5)

    message = str(info.value)
    for mirror in mirrors:
        assert f"{mirror}tiny-idx1-ubyte.gz" in message
    assert "404" in message
    assert "not an IDX file" in message
    assert "data.dir" in message and "MNIST_DIR" in message
    assert not (tmp_path / "out").exists()


def test_download_without_mirrors(tmp_path):
    with pytest.raises(UserError, match=r"data\.mirrors is empty"):
        download("tiny-idx1-ubyte", tmp_path, mirrors=[], sha256=None, timeout_s=5)


def test_download_mirror_without_trailing_slash(serve, tmp_path):
    url, root = serve()
    (root / "sub").mkdir()
    content = idx_bytes(np.arange(3, dtype=np.uint8))
    (root / "sub" / "tiny-idx1-ubyte.gz").write_bytes(gzip.compress(content))
    path = download(
        "tiny-idx1-ubyte", tmp_path, mirrors=[f"{url}sub"], sha256=sha256(content), timeout_s=5
    )
    assert path.is_file()


def test_download_falls_through_mirror_that_hangs_up(request, serve, tmp_path):
    flaky_url = _start_server(request, _DropsConnectionHandler)
    good_url, good_root = serve()
    content = idx_bytes(np.arange(6, dtype=np.uint8))
    (good_root / "tiny-idx1-ubyte.gz").write_bytes(gzip.compress(content))

    path = download(
        "tiny-idx1-ubyte",
        tmp_path,
        mirrors=[flaky_url, good_url],
        sha256=sha256(content),
        timeout_s=5,
    )

    assert path.is_file()


def test_download_falls_through_malformed_mirror(serve, tmp_path):
    good_url, good_root = serve()
    content = idx_bytes(np.arange(6, dtype=np.uint8))
    (good_root / "tiny-idx1-ubyte.gz").write_bytes(gzip.compress(content))
    mirrors = ["127.0.0.1/mnist/", good_url]  # no scheme and no port: urllib rejects it

    path = download(
        "tiny-idx1-ubyte", tmp_path, mirrors=mirrors, sha256=sha256(content), timeout_s=5
    )

    assert path.is_file()


def test_load_downloads_missing_files(serve, tmp_path):
    url, root = serve()
    contents = fake_mnist_contents()
    write_fake_mnist(root, contents)
    checksums = {name: sha256(content) for name, content in contents.items()}
    target = tmp_path / "empty"
    target.mkdir()
    cfg = data_cfg(
        target,
        download=True,
        download_timeout_s=5,
        mirrors=[closed_port_url(), url],
        sha256=checksums,
        validation_size=5,
    )

    splits = load(cfg)

    assert listing(target) == CACHED  # the downloaded files, and their arrays decoded
    assert (len(splits.train.y), len(splits.validation.y), len(splits.test.y)) == (15, 5, 10)
    np.testing.assert_array_equal(splits.validation.y, np.arange(5))

    # Once present, the files are used as they are: no mirror is needed any more.
    cfg.mirrors = [closed_port_url()]
    again = load(cfg)
    np.testing.assert_array_equal(again.train.x, splits.train.x)


def test_load_download_of_one_missing_file(serve, tmp_path):
    url, root = serve()
    contents = fake_mnist_contents()
    write_fake_mnist(root, contents)
    local = dict(contents)
    del local[TRAIN_LABELS]
    target = write_fake_mnist(tmp_path / "mnist", local, compress=False)

    load(fake_cfg(target, download=True, download_timeout_s=5, mirrors=[url]))

    assert (target / f"{TRAIN_LABELS}.gz").is_file()
    assert not (target / f"{TRAIN_IMAGES}.gz").exists()  # present files are not fetched again


# --------------------------------------------------------------------------- data=fashion_mnist


def test_fashion_mnist_option(monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    cfg = compose(["data=fashion_mnist"])
    assert FASHION_YAML.read_text().startswith("# ")
    assert cfg.data.name == "fashion_mnist"
    assert cfg.tracking.experiment_name == "fashion_mnist"
    assert cfg.data._target_ == "runner.data.idx_files"
    assert (cfg.data.validation_size, cfg.data.download) == (5000, True)
    assert cfg.data.dir == "data/fashion_mnist"
    assert dict(cfg.data.sha256) == FASHION_SHA256
    assert list(cfg.data.mirrors) == [
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ]
    monkeypatch.setenv("FASHION_MNIST_DIR", "/somewhere/fashion")
    assert compose(["data=fashion_mnist"]).data.dir == "/somewhere/fashion"


def write_fake_fashion(directory: Path, compress: bool = True) -> dict[str, bytes]:
    """A tiny Fashion-MNIST lookalike (3 classes, 30 training and 12 test images) in
    `directory`; the decompressed content of each file, by name."""
    rng = np.random.default_rng(5)
    train_images = rng.integers(0, 256, (30, 28, 28))
    train_images[0, 0, :2] = (0, 255)
    contents = {
        TRAIN_IMAGES: idx_bytes(train_images),
        TRAIN_LABELS: idx_bytes(np.arange(30) % 3),
        TEST_IMAGES: idx_bytes(rng.integers(0, 256, (12, 28, 28))),
        TEST_LABELS: idx_bytes(np.arange(12)[::-1] % 3),
    }
    write_fake_mnist(directory, contents, compress=compress)
    return contents


def stored_digests(directory: Path) -> dict[str, str]:
    """The SHA-256 of each IDX file in `directory` as stored (gzipped or not), by name."""
    return {name: sha256(next(directory.glob(f"{name}*")).read_bytes()) for name in FASHION_SHA256}


def fashion_overrides(directory: Path, digests: dict[str, str]) -> list[str]:
    return [
        "data=fashion_mnist",
        f"data.dir={directory}",
        "data.download=false",
        "data.validation_size=6",
        *(f"data.sha256.{name}={digest}" for name, digest in digests.items()),
    ]


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("digest_of", ["stored", "content"])
def test_load_fake_fashion_mnist(tmp_path, compress, digest_of):
    directory = tmp_path / "fashion"
    contents = write_fake_fashion(directory, compress=compress)
    if digest_of == "stored":
        digests = stored_digests(directory)  # as the real config's: of the .gz files
    else:
        digests = {name: sha256(content) for name, content in contents.items()}

    splits = load(compose(fashion_overrides(directory, digests)).data)

    assert splits.num_classes == 3
    assert splits.input_shape == (28, 28, 1)
    for split, n in ((splits.train, 24), (splits.validation, 6), (splits.test, 12)):
        assert split.x.shape == (n, 28, 28, 1)
        assert split.x.dtype == np.float32
        assert split.y.dtype == np.int32
    assert splits.validation.x.min() == 0.0 and splits.validation.x.max() == 1.0
    images = parse_idx(contents[TRAIN_IMAGES], "x")[..., np.newaxis] / np.float32(255)
    np.testing.assert_allclose(splits.validation.x, images[:6])
    np.testing.assert_allclose(splits.train.x, images[6:])
    np.testing.assert_array_equal(splits.validation.y, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(splits.test.y, np.arange(12)[::-1] % 3)


def test_load_fake_fashion_mnist_refuses_a_file_matching_neither_digest(tmp_path):
    directory = tmp_path / "fashion"
    contents = write_fake_fashion(directory)
    digests = stored_digests(directory)
    cfg = compose(fashion_overrides(directory, digests)).data
    path = directory / f"{TEST_LABELS}.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(12, dtype=np.uint8))))

    with pytest.raises(UserError) as info:
        load(cfg)

    message = str(info.value)
    assert message.startswith(f"{path}: SHA-256 is {sha256(path.read_bytes())} as stored ")
    assert sha256(idx_bytes(np.zeros(12, dtype=np.uint8))) in message
    assert f"expects {digests[TEST_LABELS]}" in message
    assert "delete it to download it again" in message and "~data.sha256" in message
    assert sha256(contents[TEST_LABELS]) not in message


def test_load_fashion_mnist_real_checksums_refuse_other_files(tmp_path):
    directory = tmp_path / "fashion"
    write_fake_fashion(directory)
    cfg = compose(fashion_overrides(directory, {})).data  # the published checksums
    expected = FASHION_SHA256[TRAIN_IMAGES]
    with pytest.raises(UserError, match=rf"{TRAIN_IMAGES}\.gz: SHA-256 is .* expects {expected}"):
        load(cfg)


def test_runner_trains_on_fake_fashion_mnist(tmp_path, mnist_dir):
    directory = tmp_path / "fashion"
    write_fake_fashion(directory)
    result = cli(
        "runner",
        *fashion_overrides(directory, stored_digests(directory)),
        *QUICK,
        "data.batch_size=8",
        "data.eval_batch_size=8",
        cwd=tmp_path,
        mnist_dir=mnist_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    client = store_client(tmp_path)
    [run] = client.search_runs([client.get_experiment_by_name("fashion_mnist").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.name"] == "fashion_mnist"
    assert "test/accuracy" in run.data.metrics
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert names == {f"fashion_mnist-{split}" for split in ("training", "validation", "test")}
    assert client.get_experiment_by_name("mnist") is None


# --------------------------------------------------------------------------- batch pipelines


@pytest.fixture(scope="module")
def indexed_split():
    """60 examples whose first pixel and label both hold the example's index."""
    n = 60
    x = np.zeros((n, 784), dtype=np.float32)
    x[:, 0] = np.arange(n)
    return Split(x, np.arange(n, dtype=np.int32))


@pytest.fixture(params=backends.NAMES)
def pipeline(request):
    """Each backend's batching: tf.data's on TensorFlow, NumPy's on JAX (pure NumPy, so it runs
    in this TensorFlow process)."""
    return backends.of(request.param)


def first_batches(pipeline, split: Split, batch_size: int, seed: int, count: int, start=0):
    batches = islice(iter(pipeline.training_dataset(split, batch_size, seed, start)), count)
    return [(np.asarray(x), np.asarray(y)) for x, y in batches]


def test_training_dataset_batches(pipeline, indexed_split):
    batches = first_batches(pipeline, indexed_split, 10, seed=1, count=6)
    assert len(batches) == 6
    for x, y in batches:
        assert x.shape == (10, 784) and x.dtype == np.float32
        assert y.shape == (10,) and y.dtype == np.int32
        np.testing.assert_array_equal(x[:, 0], y)  # images stay with their labels


def test_training_dataset_epoch_covers_each_example_once(pipeline, indexed_split):
    batches = first_batches(pipeline, indexed_split, 10, seed=3, count=12)
    first_epoch = np.concatenate([y for _, y in batches[:6]])
    second_epoch = np.concatenate([y for _, y in batches[6:]])
    np.testing.assert_array_equal(np.sort(first_epoch), np.arange(60))
    np.testing.assert_array_equal(np.sort(second_epoch), np.arange(60))
    assert not np.array_equal(first_epoch, np.arange(60))  # shuffled
    assert not np.array_equal(first_epoch, second_epoch)  # reshuffled each epoch


def test_training_dataset_seeded_order(pipeline, indexed_split):
    def order(seed):
        return np.concatenate([y for _, y in first_batches(pipeline, indexed_split, 10, seed, 9)])

    a, b, c = order(7), order(7), order(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:60], c[:60])


def test_training_dataset_is_endless_across_epochs(pipeline, indexed_split):
    # 60 examples in batches of 25: the stream of shuffled epochs is cut into full batches.
    batches = first_batches(pipeline, indexed_split, 25, seed=0, count=5)
    assert [len(y) for _, y in batches] == [25] * 5
    stream = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(np.sort(stream[:60]), np.arange(60))
    np.testing.assert_array_equal(np.sort(stream[60:120]), np.arange(60))


def test_a_resumed_pipeline_carries_on_where_it_stopped(pipeline, indexed_split):
    # Batches of 25 from 60 examples: step 7 starts inside the third epoch.
    whole = first_batches(pipeline, indexed_split, 25, seed=5, count=12)
    resumed = first_batches(pipeline, indexed_split, 25, seed=5, count=5, start=7)
    for (_, expected), (_, found) in zip(whole[7:], resumed, strict=True):
        np.testing.assert_array_equal(found, expected)


@pytest.mark.parametrize("start", [0, 8, 9])
def test_every_nth_batch_is_the_batch_of_those_steps(pipeline, indexed_split, start):
    # The probabilities hook's view of the order: the batches of steps 4, 8, 12, ... after start.
    whole = first_batches(pipeline, indexed_split, 10, seed=2, count=24)
    replayed = pipeline.every_nth_batch(n=60, batch_size=10, seed=2, every=4, start_step=start)
    found = list(islice(replayed, 3))
    steps = [step for step in range(start + 1, 25) if step % 4 == 0][:3]
    for step, indices in zip(steps, found, strict=True):
        np.testing.assert_array_equal(indices, whole[step - 1][1])


def test_training_dataset_batch_larger_than_split(pipeline, indexed_split):
    with pytest.raises(UserError, match=r"batch of 61 examples \(data\.batch_size times .* 60 "):
        first_batches(pipeline, indexed_split, 61, seed=0, count=1)


# --------------------------------------------------------------------------- npz and loaders


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def npz_cfg(path: Path) -> object:
    return compose(["data=npz", f"data.path={path}", "data.validation_size=2"]).data


def test_npz_of_cifar_layout_loads_with_labels_of_shape_n_by_1(tmp_path):
    """keras.datasets' CIFAR sets store labels as (N, 1); float images are kept as they are."""
    rng = np.random.default_rng(0)
    path = write_npz(
        tmp_path / "cifar_like.npz",
        x_train=rng.random((8, 6, 5, 3), dtype=np.float32),
        y_train=np.array([[0], [1], [2], [0], [1], [2], [0], [1]]),
        x_test=rng.random((4, 6, 5, 3), dtype=np.float32),
        y_test=np.array([[2], [1], [0], [1]]),
    )
    splits = load(npz_cfg(path))
    assert (splits.input_shape, splits.num_classes) == ((6, 5, 3), 3)
    assert splits.train.y.tolist() == [2, 0, 1, 2, 0, 1]
    assert splits.test.x.max() < 1.0 and splits.test.x.dtype == np.float32


def test_doubtful_data_is_warned_of_in_a_line_each_and_trains(in_tmp_store, caplog):
    """Labels 1 to 4, class 4 in the test set alone, float pixels of 0 to 255: data that trains,
    but likely not as its maker meant."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 8, 8)).astype(np.float32)
    images[0, 0, 0] = 255
    labels = 1 + np.arange(400) % 4
    labels[:300] = np.minimum(labels[:300], 3)
    path = write_npz(
        in_tmp_store / "doubtful.npz",
        x_train=images[:300],
        y_train=labels[:300],
        x_test=images[300:],
        y_test=labels[300:],
    )
    sizes = ["data.batch_size=50", "data.eval_batch_size=50"]
    with caplog.at_level(logging.WARNING, logger="runner.data"):
        train(compose(["data=npz", f"data.path={path}", *QUICK, *sizes]))
    where = "data (runner.data.npz_file)"
    assert [r.getMessage() for r in caplog.records if r.name == "runner.data"] == [
        f"{where}: y_train's labels start at 1, not 0, so the model gets outputs for classes "
        f"with no example: number the classes from 0 (subtract 1 from the labels)",
        f"{where}: the training split has no example of class 4, which the model cannot learn: "
        f"check the labels (or raise data.limit)",
        f"{where}: the images of the training, validation and test splits reach 255, beyond 1: "
        f"probably unscaled 0-255 pixels; divide the float images by 255, or store them as "
        f"uint8, which the runner scales to [0, 1]",
    ]
    assert only_run(in_tmp_store, "npz").info.status == "FINISHED"


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y_train": np.zeros(8, np.float32)}, "y_train has shape (8,) and type float32"),
        ({"y_test": -np.ones(4, np.int64)}, "y_test holds the label -1"),
        ({"x_test": np.zeros((4, 7, 7), np.uint8)}, "training images are (6, 6, 1) but test"),
        ({"x_train": np.zeros((8, 36), np.uint8)}, "x_train has shape (8, 36)"),
        ({"y_train": np.zeros(7, np.int64)}, "x_train holds 8 examples but y_train 7"),
        ({"x_test": np.full((4, 6, 6), np.nan, np.float32)}, "x_test holds NaN or infinite"),
    ],
)
def test_npz_arrays_that_cannot_train_are_refused_naming_them(tmp_path, arrays, message):
    good = {
        "x_train": np.zeros((8, 6, 6), np.uint8),
        "y_train": np.zeros(8, np.int64),
        "x_test": np.zeros((4, 6, 6), np.uint8),
        "y_test": np.zeros(4, np.int64),
    }
    path = write_npz(tmp_path / "bad.npz", **{**good, **arrays})
    with pytest.raises(UserError) as error:
        load(npz_cfg(path))
    assert message in str(error.value)
