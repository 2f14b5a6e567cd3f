"""Load TensorFlow without its start-up noise, keeping every line that matters.

TensorFlow's C++ code logs through abseil, which writes whatever is logged before
`absl::InitializeLog()` to stderr regardless of TF_CPP_MIN_LOG_LEVEL (abseil-cpp#1957,
tensorflow#102212). So every run on a CPU machine printed TensorFlow's oneDNN and cudart INFO
lines and, as an ERROR, "failed call to cuInit", which only says that there is no NVIDIA driver.
`load_tensorflow` imports TensorFlow and lets it find its devices with stderr's file descriptor
(where C++ writes) passed through a filter that drops the lines below TF_CPP_MIN_LOG_LEVEL and,
on a machine without an NVIDIA device, the cuInit failure; every other line goes through as it
comes.
"""

import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

# abseil's prefix: severity letter, MMDD and time (before InitializeLog "0000 00:00:<epoch>"),
# thread id, file:line]
_ABSEIL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]\s]+\] ")
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
_PREINIT_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called"
_NO_DRIVER = b"failed call to cuInit"


def load_tensorflow() -> ModuleType:
    """`tensorflow`, imported and its devices found, the noise above filtered out. Unless set
    otherwise, TF_CPP_MIN_LOG_LEVEL=1 keeps TensorFlow's warnings and errors, not its INFO."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with _filtered_stderr(keeper(_min_log_level(), _has_nvidia_device())):
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


def keeper(min_level: int, nvidia_device: bool) -> Callable[[bytes], bool]:
    """Whether a line written to stderr while TensorFlow loads is shown."""

    def keep(line: bytes) -> bool:
        if line.startswith(_PREINIT_NOTICE):
            return False
        prefix = _ABSEIL_LINE.match(line)
        if prefix is None:
            return True
        if _SEVERITY[prefix[1]] < min_level:
            return False
        return nvidia_device or _NO_DRIVER not in line

    return keep


@contextmanager
def _filtered_stderr(keep: Callable[[bytes], bool]) -> Iterator[None]:
    """Routes file descriptor 2 through a pipe, whose lines a thread forwards if `keep` says so,
    until the block ends."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    stderr = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if keep(line):
                    os.write(stderr, line)

    forwarder = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)  # closes the pipe's last write end, which ends the forwarder's loop
        forwarder.join(timeout=10)
        if not forwarder.is_alive():  # else a child process still holds the pipe: leave it be
            os.close(stderr)


def _min_log_level() -> int:
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    return int(level) if level.isdigit() else 0


def _has_nvidia_device() -> bool:
    return Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))
