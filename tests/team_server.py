"""A team's tracking server for the tests, started by the README's own "For a team" commands: a
private PostgreSQL cluster, `mlflow server --app-name basic-auth` over it with the artifacts it
keeps, and the accounts alice (who owns the experiment) and bob (who may read it).

tests/conftest.py registers this module as a plugin, so a test asks for `team_server` by name
(importing it too would make a second server); its module runs on the worker holding the one
server with `pytestmark = pytest.mark.xdist_group("team_server")`.
"""

import base64
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import readme_commands

SECTION = "For a team"
# Who the README's commands make, and the experiment alice creates and shares with bob.
OWNER, READER, ADMIN, EXPERIMENT = "alice", "bob", "admin", "mnist"
# The variables an `export` line of the section may set; the fixture gives each its own value.
SETTINGS = {
    "TEAM_DIR",
    "PGPORT",
    "MLFLOW_PORT",
    "PGPASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    f"{OWNER.upper()}_PASSWORD",
    f"{READER.upper()}_PASSWORD",
}
TRACKING = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# How long `mlflow server` may take to answer: 20-60 s on 2 busy cores.
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Account:
    """A user of the server: a name and a password."""

    name: str
    password: str


def exported(command: str) -> set[str]:
    """The names an `export NAME=VALUE ...` line sets."""
    return set(re.findall(r"(?:^export|\s)([A-Z_]+)=", command))


def postgresql_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries: on PATH, else Debian's newest."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free now."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class TeamServer:
    """The running server and what a test needs of it: its URL, the accounts, the experiment,
    the environment to run a command as one user, the database URI, and stop()/start() to take
    the server (not PostgreSQL) away and bring it back on the same port and stores."""

    def __init__(self, base: Path, bin_dir: Path, user: str | None) -> None:
        self.base = base
        self.dir = base / "team"
        self.bin_dir = bin_dir
        self.pg_user = user  # who runs PostgreSQL's commands when we are root
        self.pg_port, self.port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.pg_password = secrets.token_urlsafe(18)
        self.admin = Account(ADMIN, secrets.token_urlsafe(18))
        self.owner = Account(OWNER, secrets.token_urlsafe(18))
        self.reader = Account(READER, secrets.token_urlsafe(18))
        self.experiment = EXPERIMENT
        self.experiment_id = ""
        # The MLflow database itself, as a tracking URI (a role with a password).
        self.db_uri = f"postgresql://mlflow:{self.pg_password}@127.0.0.1:{self.pg_port}/mlflow"
        self.log = base / "mlflow-server.log"
        self.runner_commands: list[str] = []
        self._server_command = ""
        self._pg_stop = ""
        self._server: subprocess.Popen | None = None
        self._settings = {
            "TEAM_DIR": str(self.dir),
            "PGPORT": str(self.pg_port),
            "MLFLOW_PORT": str(self.port),
            "PGPASSWORD": self.pg_password,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin.password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
            "MLFLOW_TRACKING_URI": self.url,
            f"{OWNER.upper()}_PASSWORD": self.owner.password,
            f"{READER.upper()}_PASSWORD": self.reader.password,
        }

    def account(self, user: "Account | str") -> Account:
        """An account by itself, its name, or its role: "owner", "reader" or "admin"."""
        if isinstance(user, Account):
            return user
        roles = {"owner": self.owner, "reader": self.reader, "admin": self.admin}
        by_name = {a.name: a for a in roles.values()}
        return roles.get(user) or by_name[user]

    def env(self, user: "Account | str | None" = None, password: str | None = None) -> dict:
        """The environment for a command run as `user` (its password, or `password`) against
        the server; without a user, none of the credentials. Nothing of the outer environment's
        MLFLOW_TRACKING_* is kept."""
        env = {k: v for k, v in os.environ.items() if k not in TRACKING}
        env["MLFLOW_TRACKING_URI"] = self.url
        if user is not None:
            account = self.account(user)
            env["MLFLOW_TRACKING_USERNAME"] = account.name
            env["MLFLOW_TRACKING_PASSWORD"] = account.password if password is None else password
        return env

    @contextmanager
    def as_user(self, user: "Account | str" = "admin") -> Iterator[None]:
        """This process talks to the server as `user`: an `MlflowClient(url)` reads the
        credentials from the environment at each request."""
        saved = {k: os.environ.get(k) for k in TRACKING}
        os.environ.update({k: v for k, v in self.env(user).items() if k in TRACKING})
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def api(self, path: str, user: "Account | str" = "admin", **params: str) -> dict:
        """GET a REST endpoint of the server as `user`, e.g. api("3.0/mlflow/users/get", ...)."""
        account = self.account(user)
        query = urllib.parse.urlencode(params)
        request = urllib.request.Request(f"{self.url}/api/{path}?{query}")
        token = base64.b64encode(f"{account.name}:{account.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def _command_env(self) -> dict[str, str]:
        """The README commands' environment: the section's variables, the project's
        environment's commands for `uv run X`, and PostgreSQL's on PATH."""
        env = {k: v for k, v in os.environ.items() if k not in TRACKING}
        env.update(self._settings)
        path = env.get("PATH", "")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(self.bin_dir), path])
        return env

    def _shell(self, command: str) -> list[str]:
        """bash running `command` as written, `uv run X` as the project environment's X, and a
        PostgreSQL command as the unprivileged user when we are root."""
        command = re.sub(r"(^|\s)uv run ", r"\1", command)
        if self.pg_user and (self.bin_dir / command.split()[0]).exists():
            return ["runuser", "-u", self.pg_user, "--", "bash", "-c", command]
        return ["bash", "-c", command]

    def _run(self, command: str) -> None:
        result = subprocess.run(
            self._shell(command),
            cwd=self.base,
            env=self._command_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"README command failed: {command}\n{result.stderr[-3000:]}")

    def setup(self) -> None:
        """Run the section's commands: the settings checked, PostgreSQL and the server started,
        the accounts made; `uv run runner...` lines are left to the tests."""
        commands = readme_commands(SECTION)
        # Known before anything starts, so that a failure on the way still stops PostgreSQL.
        self._pg_stop = next(c for c in commands if c.startswith("pg_ctl") and " stop" in c)
        for command in commands:
            if command.startswith("export "):
                unknown = exported(command) - SETTINGS
                assert not unknown, f"README sets {unknown}, which tests/team_server.py lacks"
            elif " mlflow server " in f" {command} ":
                # One worker, not the README's default four: it starts in half the time on 2
                # busy cores, and serves a test's few clients as well.
                self._server_command = f"{command} --workers 1"
                self.start()
            elif command == self._pg_stop:
                continue
            elif command.startswith("uv run runner"):
                self.runner_commands.append(command)
            else:
                self._run(command)
        assert self._server_command, "the README's section starts no mlflow server"
        with self.as_user(self.owner):
            self.experiment_id = (
                MlflowClient(self.url).get_experiment_by_name(self.experiment).experiment_id
            )
        for account, permission in ((self.owner, "MANAGE"), (self.reader, "READ")):
            granted = self.api(
                "3.0/mlflow/users/permissions/get",
                username=account.name,
                resource_type="experiment",
                resource_id=self.experiment_id,
            )
            assert granted["permission"] == permission, (account.name, granted)

    def start(self) -> None:
        """Start `mlflow server` (the README's command) and wait until it answers."""
        assert self._server is None, "the server is running already"
        with self.log.open("a") as log:
            self._server = subprocess.Popen(
                self._shell(self._server_command),
                cwd=self.dir,
                env=self._command_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers share the process group, stopped with it
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5).close()
                return
            except OSError:
                if self._server.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = self.log.read_text()[-3000:]
                    raise RuntimeError(f"mlflow server did not start:\n{tail}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop `mlflow server` and its workers, by its process group."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        except ProcessLookupError:
            server.wait(timeout=30)
        # A worker that outlived its parent still holds the group: end it too.
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop the server, then PostgreSQL (the README's command, else by its process id)."""
        self.stop()
        pid_file = self.dir / "pg" / "postmaster.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().split()[0])
        stopped = self._pg_stop and subprocess.run(
            self._shell(self._pg_stop),
            cwd=self.base,
            env=self._command_env(),
            capture_output=True,
            timeout=60,
        )
        if not stopped or stopped.returncode != 0:
            with suppress(ProcessLookupError):  # PostgreSQL's immediate shutdown
                os.kill(pid, signal.SIGQUIT)


@pytest.fixture(scope="session")
def team_server() -> Iterator[TeamServer]:
    """The team server of the README's "For a team" section, once per test session."""
    bin_dir = postgresql_bin()
    pg_user = None
    if os.geteuid() == 0:
        try:
            pg_user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            bin_dir = None
    if bin_dir is None:
        reason = "PostgreSQL and its user 'postgres' (Debian's postgresql package)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} missing in CI: .ci/run installs Debian's postgresql")
        pytest.skip(f"needs {reason}: apt-get install postgresql")
    # As root, in /tmp, which the unprivileged user can reach whatever TMPDIR says.
    base = Path(tempfile.mkdtemp(prefix="team-", dir="/tmp" if pg_user else None))
    if pg_user:
        shutil.chown(base, user=pg_user)  # initdb makes $TEAM_DIR inside it
    server = TeamServer(base, bin_dir, pg_user)
    try:
        server.setup()
        yield server
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)
