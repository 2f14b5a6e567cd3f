"""TensorFlow's start-up noise is filtered out of stderr, and nothing else is."""

import os
import sys

from runner.backends.tensorflow_logs import _filtered_stderr, keeper

INFO = b"I0000 00:00:1795397111.569199   24310 port.cc:153] oneDNN custom operations are on.\n"
NO_DRIVER = (
    b"E0000 00:00:1795397112.880667   24310 cuda_platform.cc:52] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
WARNING = b"W0000 00:00:1795397115.000393   24310 dataset.cc:997] Input will not be optimized\n"
OTHER_ERROR = b"E0000 00:00:1795397112.880667   24310 bfc_allocator.cc:1] out of memory\n"


def test_only_info_below_the_level_and_a_driverless_cuinit_failure_are_dropped():
    keep = keeper(1, nvidia_device=False)
    assert not any(map(keep, [INFO, NO_DRIVER, NOTICE]))
    assert all(map(keep, [WARNING, OTHER_ERROR, b"Traceback (most recent call last):\n"]))
    assert keeper(1, nvidia_device=True)(NO_DRIVER), "with an NVIDIA device, it is a real error"
    assert keeper(0, nvidia_device=False)(INFO)
    assert not keeper(2, nvidia_device=False)(WARNING)


def test_lines_written_to_the_file_descriptor_go_through_the_filter(capfd):
    with _filtered_stderr(keeper(1, nvidia_device=False)):
        os.write(2, INFO + NO_DRIVER + OTHER_ERROR)
        print("a Python warning", file=sys.stderr)
    os.write(2, INFO)  # after the block, nothing is filtered
    err = capfd.readouterr().err
    assert err.count("oneDNN custom operations") == 1
    assert "cuInit" not in err
    assert "out of memory" in err and "a Python warning" in err
