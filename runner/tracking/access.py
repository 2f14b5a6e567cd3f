"""Whether this user may record on a tracking server, asked before any training.

A server started with `mlflow server --app-name basic-auth` answers 401 to a missing or wrong
password and 403 to a user without permission, which MLflow raises as a traceback at the first
write: after the data and the model were built. `check_can_record` asks first, and each refusal
becomes one line that names the user, what is missing and how to fix it.
"""

from typing import Any
from urllib.parse import urlsplit

from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from runner.errors import UserError
from runner.masking import mask

# The permissions of MLflow's auth app that allow writing runs (mlflow.server.auth.permissions,
# whose import loads the whole server).
_CAN_WRITE = {"EDIT", "MANAGE"}
_CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def user(uri: str) -> str | None:
    """Who MLflow authenticates as on `uri`: the URI's own user, else MLFLOW_TRACKING_USERNAME
    (or ~/.mlflow/credentials)."""
    return urlsplit(uri).username or get_default_host_creds(uri).username


def refusal(error: MlflowException, uri: str, experiment: str | None = None) -> UserError | None:
    """A 401 or 403 from the server at `uri` as one line; None for any other error."""
    return _refused(error.error_code, uri, experiment)


def _refused(code: str, uri: str, experiment: str | None) -> UserError | None:
    where = mask(uri)
    name = user(uri)
    in_uri = urlsplit(uri).username is not None
    credentials = "the user and password in the URI" if in_uri else _CREDENTIALS
    if code == "UNAUTHENTICATED":
        if name is None:
            return UserError(
                f"the MLflow tracking server {where} asks who you are: set {_CREDENTIALS} "
                f"to your user name and password there"
            )
        if not in_uri and not get_default_host_creds(uri).password:
            return UserError(
                f"the MLflow tracking server {where} asks user {name!r} for a password: set "
                f"MLFLOW_TRACKING_PASSWORD"
            )
        return UserError(
            f"the MLflow tracking server {where} refused user {name!r}: the user does not exist "
            f"there or the password is wrong; check {credentials}, or ask its admin for an "
            f"account"
        )
    if code == "PERMISSION_DENIED":
        if experiment is None:
            return UserError(
                f"user {name!r} may not read this on the MLflow tracking server {where}: ask "
                f"the owner of its experiment, or the server's admin, for READ permission"
            )
        return UserError(
            f"user {name!r} may not use experiment {experiment!r} on the MLflow tracking "
            f"server {where}: ask its owner or the server's admin for EDIT permission, or "
            f"record elsewhere with tracking.experiment_name=NAME"
        )
    return None


def check_credentials(uri: str) -> None:
    """Refuse, in one line, missing or wrong credentials for the server at `uri`, before a
    command's first real request would raise them as a traceback."""
    answer = _current_user(uri)
    if answer is not None and answer.status_code == 401:
        raise _refused("UNAUTHENTICATED", uri, None)


def _is_admin(uri: str) -> bool:
    """Whether the server's auth app knows this user as an admin, who may do anything."""
    answer = _current_user(uri)
    return answer is not None and answer.ok and bool(answer.json()["user"].get("is_admin"))


def _current_user(uri: str) -> Any:
    """The server's answer to who this user is (401 without valid credentials, 404 without the
    auth app); None when it cannot answer now, which the command's first request will tell."""
    try:
        return http_request(
            get_default_host_creds(uri), "/api/2.0/mlflow/users/current", "GET", max_retries=0
        )
    except MlflowException:
        return None


def check_can_record(uri: str, experiment_id: str, experiment: str) -> None:
    """Refuse, in one line, a user who may read `experiment` on the server at `uri` but not
    write runs into it. Servers without MLflow's auth app let everyone write."""
    try:
        answer = http_request(
            get_default_host_creds(uri),
            "/api/3.0/mlflow/users/permissions/get",
            "GET",
            params={
                "username": user(uri) or "",
                "resource_type": "experiment",
                "resource_id": experiment_id,
            },
            max_retries=0,
            timeout=30,
        )
    except MlflowException:
        return  # the server asks no questions or cannot answer: its first write will tell
    if answer.status_code == 404 or not answer.ok:  # no auth app: anyone may write
        return
    permission = answer.json().get("permission")
    if permission not in _CAN_WRITE and not _is_admin(uri):
        may = "only read" if permission in ("READ", "USE") else "not use"
        raise UserError(
            f"user {user(uri)!r} may {may} experiment "
            f"{experiment!r} on the MLflow tracking server {mask(uri)} (permission "
            f"{permission or 'none'}): ask its owner or the server's admin for EDIT on it, or "
            f"record into an experiment of your own with tracking.experiment_name=NAME"
        )
