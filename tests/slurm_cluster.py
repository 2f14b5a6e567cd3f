"""A one-node SLURM cluster on this machine, for the tests: munged, slurmctld and slurmd on
127.0.0.1, configured in a temporary folder, started once per test session and stopped by
their process ids afterwards. Commands find it through `SLURM_CONF` in `SlurmCluster.env`.

A test module asks for the fixture by name (tests/conftest.py registers this module as a plugin)
and keeps its tests on one xdist worker (`pytest.mark.xdist_group("slurm")`), so that they
share one cluster."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

PARTITION = "cpu"
# Seconds SLURM holds a requeued job before it may start again: BeginTime = now +
# cred_expire + 1 (job_mgr.c). 5 is the least Slurm 22.05 accepts (slurm_cred.c); its default
# of 120 would make every requeue in a test wait two minutes.
CRED_EXPIRE_S = 5


@dataclass(frozen=True)
class SlurmCluster:
    # The environment to run commands with: this process's, and SLURM_CONF.
    env: dict[str, str]
    # A partition without GPUs, whose node has the machine's CPUs and memory.
    partition: str
    # slurmctld.log, slurmd.log and the daemons' own output.
    logs: Path
    conf: Path

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM command (`squeue`, `scontrol`, `scancel`, ...) against this cluster."""
        return subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=60, check=check
        )

    def final_states(self, job: str, timeout_s: float = 60) -> list[str]:
        """`<id> <state> <partition>` of each task of `job` once none is pending or running:
        a task's result file is written a moment before SLURM marks it COMPLETED."""
        deadline = time.monotonic() + timeout_s
        while True:
            queue = self.run("squeue", "-h", "-r", "-t", "all", "-o", "%i %T %P", "-j", job)
            lines = sorted(queue.stdout.splitlines())
            if time.monotonic() > deadline or not any(
                state in line for line in lines for state in ("PENDING", "RUNNING", "COMPLETING")
            ):
                return lines
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The cluster, up and with its node idle; every daemon it started is stopped afterwards,
    whatever the tests did, and any job still queued is cancelled first."""
    _check_installed()
    folder = tmp_path_factory.mktemp("slurm")
    logs = folder / "log"
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir()
    with ExitStack() as stack:
        munge_dir = _munge_dir()
        stack.callback(shutil.rmtree, munge_dir, ignore_errors=True)
        socket_path = munge_dir / "socket"
        munged = _start(
            stack,
            [
                _which("munged"),
                "--foreground",
                f"--socket={socket_path}",
                f"--key-file={munge_dir / 'munge.key'}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
                f"--log-file={munge_dir / 'munged.log'}",
            ],
            logs / "munged.out",
            user="munge",
        )
        _wait_for(lambda: socket_path.exists(), "munged to open its socket", [munged], logs)
        conf = folder / "slurm.conf"
        conf.write_text(_slurm_conf(folder, socket_path))
        cluster = SlurmCluster({**os.environ, "SLURM_CONF": str(conf)}, PARTITION, logs, conf)
        daemons = [munged]
        for name in ("slurmctld", "slurmd"):
            daemons.append(
                _start(stack, [_which(name), "-D"], logs / f"{name}.out", env=cluster.env)
            )
        stack.callback(_drain, cluster)  # runs before the daemons stop
        _wait_for(
            lambda: (
                cluster.run("sinfo", "-h", "-o", "%t", "-p", PARTITION, check=False).stdout
                == "idle\n"
            ),
            "the node to be idle",
            daemons,
            logs,
        )
        yield cluster


def _check_installed() -> None:
    """Skip where SLURM is missing, except in CI, where .ci/run installs it."""
    missing = [n for n in ("munged", "slurmctld", "slurmd", "sbatch") if not _which(n)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI: .ci/run installs slurm-wlm, munge")
        pytest.skip("needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        reason = "a SLURM cluster needs root, to run munged as munge and slurmd as root"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _which(name: str) -> str | None:
    """A SLURM or munge program, also in /usr/sbin where a user's PATH may not look."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _munge_dir() -> Path:
    """munged's folder, with its own key: the munge user must reach it, and munged refuses a
    path that others may write to, so it is made in /tmp rather than under pytest's folder."""
    folder = Path(tempfile.mkdtemp(prefix="munge-"))
    folder.chmod(0o755)
    key = folder / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    for path in (folder, key):
        shutil.chown(path, "munge", "munge")
    return folder


def _slurm_conf(folder: Path, munge_socket: Path) -> str:
    """slurm.conf for one node, this machine, as `slurmd -C` describes it."""
    host = socket.gethostname().split(".")[0]
    node = subprocess.run(
        [_which("slurmd"), "-C"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    return f"""\
ClusterName=runner-tests
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
MailProg={shutil.which("true")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Pending jobs are looked at every second rather than every minute: a requeued job starts
# as soon as its BeginTime passes.
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(
    stack: ExitStack, command: list[str], output: Path, **options: object
) -> subprocess.Popen:
    """A daemon in the foreground, in its own session (Ctrl-C reaches the fixture, which stops
    it), stopped by its pid when `stack` closes."""
    with output.open("w") as sink:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **options,
        )
    stack.callback(_stop, process)
    return process


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _drain(cluster: SlurmCluster) -> None:
    """Cancel what is left in the queue and wait until its processes are gone, so that no job
    outlives the cluster."""
    cluster.run("scancel", f"--partition={cluster.partition}", check=False)
    deadline = time.monotonic() + 90  # a cancelled job gets KillWait (30 s) before SIGKILL
    while cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)


def _wait_for(
    ready: Callable[[], bool], what: str, daemons: list[subprocess.Popen], logs: Path
) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        dead = [d for d in daemons if d.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {path.name}\n{path.read_text()[-1500:]}" for path in sorted(logs.iterdir())
            )
            pytest.fail(f"SLURM did not start: waiting for {what}\n{tails}")
        time.sleep(0.2)
