"""Errors that a user caused and can fix: reported as one clear line, without a traceback."""

import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from yaml import YAMLError

from runner.masking import mask


class UserError(Exception):
    """Bad input (config, data files, environment); the message says what is wrong and the fix.
    The command exits with `exit_code`."""

    exit_code = 1


class Interrupted(UserError):
    """Training stopped on a signal (SIGINT, SIGTERM, SIGUSR2), after writing a checkpoint; the
    run ends KILLED. Exits 128 + the signal's number, as a process killed by it would."""

    def __init__(self, message: str, stopped_by: signal.Signals):
        super().__init__(message)
        self.signal = stopped_by
        self.exit_code = 128 + stopped_by


class Stopped(KeyboardInterrupt):
    """A stop signal outside the training steps (SIGTERM, SIGUSR2, or Ctrl-C), raised as Python
    raises KeyboardInterrupt for Ctrl-C, so that whatever is under way stops at once; its
    message names the signal."""

    def __init__(self, stopped_by: signal.Signals):
        super().__init__(stopped_by.name)
        self.signal = stopped_by


class ServerLost(UserError):
    """The MLflow tracking server stopped answering for longer than the run waits: training
    stopped with a checkpoint holding the metrics it did not take."""


@contextmanager
def reported(command: str) -> Iterator[None]:
    """Every command's handling of a `UserError`: `COMMAND: error: MESSAGE` on stderr, one line,
    and exit with the error's code; of Ctrl-C (or a signal raised as it), one line too."""
    try:
        yield
    except UserError as error:
        print(f"{command}: error: {mask(str(error))}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt as error:  # before or after training, which says more itself
        stopped_by = stop_signal(error)
        print(f"{command}: stopped by {stopped_by.name}", file=sys.stderr)
        raise SystemExit(128 + stopped_by) from None


def stop_signal(error: KeyboardInterrupt | Interrupted) -> signal.Signals:
    """The signal a stop stands for: the one a `Stopped` or `Interrupted` carries, Ctrl-C's for
    Python's own KeyboardInterrupt."""
    return error.signal if isinstance(error, Stopped | Interrupted) else signal.SIGINT


def run_hydra_app(
    command: str,
    app: Callable[[], Any],
    explain: Callable[[BaseException], str | None] | None = None,
) -> None:
    """Run the `@hydra.main` function `app` as the command `command`. Hydra's own errors (an
    unknown option, a misspelt key, a value of the wrong type, a YAML file that does not parse)
    are told in one line, as a `UserError` is, instead of Hydra's report of several;
    HYDRA_FULL_ERROR=1 still shows that. So is any other error that `explain` turns into a
    message (a launcher's lost job, say)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        with reported(command):
            app()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors rather than prints them
    try:
        with reported(command):
            app()
    except (HydraException, OmegaConfBaseException, YAMLError) as error:
        print(f"{command}: error: {mask(misspelt_key(error) or one_line(error))}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as error:
        message = explain(error) if explain else None
        if message is None:
            raise
        print(f"{command}: error: {mask(message)}", file=sys.stderr)
        raise SystemExit(1) from None


def misspelt_key(error: BaseException) -> str | None:
    """For an override of a key the config lacks, the closest key there is, where Hydra would
    suggest adding the misspelt one with `+`; None for any other error."""
    cause = error.__cause__
    if not str(error).startswith("Could not override") or not isinstance(
        cause, ConfigAttributeError | ConfigKeyError
    ):
        return None
    parent, key, full = cause.parent_node, cause.key, str(cause.full_key)
    if parent is None or key is None:
        return None
    keys = [str(k) for k in parent if k != "hydra"]
    prefix = full[: -len(str(key))]
    hint = did_you_mean(str(key), keys, prefix)
    if hint:
        return f"{full} is not a key of the config: {hint}"
    where = f"{prefix.rstrip('.')}'s keys" if prefix else "the top-level keys"
    # A builder's or loader's own key may be added to its node, which no schema closes.
    add = (
        f"; to add one for its _target_: +{full}=VALUE"
        if OmegaConf.get_type(parent) is dict
        else ""
    )
    return f"{full} is not a key of the config; {where} are {', '.join(keys)}{add}"


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str | None:
    """ "did you mean PREFIX+CHOICE?" for the choice closest to a misspelt `word`; None when no
    choice is close. Every command suggests a name alike, whatever the name is of."""
    from difflib import get_close_matches

    close = get_close_matches(word, list(choices), n=1)
    return f"did you mean {prefix}{close[0]}?" if close else None


# Lines of Hydra's and OmegaConf's reports that locate an error rather than say what it is.
_DETAIL = ("full_key:", "object_type=", "reference_type=", "Set the environment variable")


def one_line(error: BaseException) -> str:
    """Hydra's report as one line: "In 'config': Could not find 'model/resnet'. Available options
    in 'model': cnn_layers, cnn_raw, softmax". The config search path and the keys' locations
    are left out; the OmegaConf error behind a Hydra one is added."""
    text = str(error)
    if isinstance(error.__cause__, OmegaConfBaseException):
        text += "\n" + str(error.__cause__)
    sentences: list[str] = []
    items: list[str] = []
    for raw in text.split("Config search path:")[0].splitlines():
        line = raw.strip()
        if not line or line.startswith(_DETAIL):
            continue
        if raw[:1].isspace() and sentences and sentences[-1].endswith(":"):
            items.append(line)
            continue
        if items:
            sentences[-1] += " " + ", ".join(items)
            items = []
        sentences.append(line)
    if items:
        sentences[-1] += " " + ", ".join(items)
    return ". ".join(sentence.rstrip(".") for sentence in sentences)
