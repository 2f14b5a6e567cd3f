"""Credentials in URIs, masked wherever the runner writes or prints them.

A tracking URI such as `postgresql://user:secret@db/mlflow` or `https://user:token@host`, or
any other config value holding a URI, would otherwise land in the run's parameters, its
`config.yaml`, Hydra's record of the overrides, the run name and the console, readable by
everyone who can read the run. The password of a URI's user, and the value of a query parameter
named like a secret (`?token=...`, `&sig=...`), become `***`; the rest stays, so that the
record still says which server and which user.
"""

import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

MASK = "***"

# Hydra writes an override's colons escaped: tracking.uri=http\://user\:secret@host. A password
# may hold "/" (SQLAlchemy takes it) and runs to the token's last "@".
_PASSWORD = re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*\\?://[^\s/:@\\]*\\?:)\S+(?=@)")
_SECRET_PARAMETER = re.compile(
    r"(?P<keep>[?&][^\s=&#]*(?:token|password|passwd|pwd|secret|key|sig|signature|credential)"
    r"[^\s=&#]*=)[^\s&#'\"]+",
    re.IGNORECASE,
)


def mask(text: str) -> str:
    """`text` with every URI's password and secret query values replaced by `***`."""
    if "//" not in text:
        return text
    text = _PASSWORD.sub(rf"\g<keep>{MASK}", text)
    return _SECRET_PARAMETER.sub(rf"\g<keep>{MASK}", text)


def mask_files(*paths: Path) -> None:
    """Mask the secrets in each text file that exists, in place: Hydra writes the config and the
    command line's overrides into the run's folder as given (`runner.sweeps.jobs` finds them)."""
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text()
        masked = mask(text)
        if masked != text:  # jobs starting at once may each mask the sweep's multirun.yaml
            temporary = path.with_name(f".{path.name}.masking-{os.getpid()}")
            temporary.write_text(masked)
            temporary.replace(path)  # whole, even for a reader of the folder at that moment


def install_masking() -> None:
    """Mask secrets in every log record from now on, whichever logger or handler writes it
    (Hydra's launchers log each job's overrides, and MLflow the run's address), and in the
    tracebacks and warnings Python prints."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "masks_secrets", False):
        return
    sys.excepthook = _masked_excepthook
    printed = warnings.showwarning

    def masked_warning(message: Warning | str, *where: object) -> None:
        """`warnings.showwarning`'s: the message masked, its category and place as they are."""
        printed(mask(str(message)), *where)

    warnings.showwarning = masked_warning

    def masking_factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format or argument: the handler reports it as usual
            return record
        if "//" in message:
            record.msg, record.args = mask(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask("".join(traceback.format_exception(*record.exc_info)).rstrip())
        return record

    masking_factory.masks_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masking_factory)


def _masked_excepthook(kind: type[BaseException], error: BaseException, tb) -> None:
    text = "".join(traceback.format_exception(kind, error, tb))
    print(mask(text), end="", file=sys.stderr)
