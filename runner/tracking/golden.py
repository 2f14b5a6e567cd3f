"""Golden files of `runner-repro`: a run's command-line overrides, config, environment and
metric histories in a small JSON file a repository commits. Read, written and judged here: the
config keys that name the machine (never a change), and the tolerance a rerun is held to where
the environment differs. Light: the command line reads these before MLflow loads."""

import json
from pathlib import Path

from runner.errors import UserError

# Config keys that name the machine a run ran on, not what it trained: never drift. `hydra`
# covers everything under it.
MACHINE_KEYS = ("tracking.uri", "trainer.checkpoint_dir", "data.dir", "data.path", "hydra")
# The environment keys that decide whether a rerun must be bitwise equal: other versions, Python
# or processors round otherwise.
SAME_IF_EQUAL = ("packages", "python", "machine", "cpu")
# A golden file's tolerance where those differ.
OTHER_ENVIRONMENT_RTOL = 1e-3


def machine_key(key: str) -> bool:
    """Whether dotted config `key` is, or lies under, one of the MACHINE_KEYS."""
    return any(key == name or key.startswith(f"{name}.") for name in MACHINE_KEYS)


def golden_rtol(recorded: dict, found: dict, rtol: float | None = None) -> float:
    """The relative tolerance a golden file's rerun is checked with: `rtol` if given; else 0
    where the rerun's environment `found` is the `recorded` one in each of SAME_IF_EQUAL, and
    OTHER_ENVIRONMENT_RTOL otherwise."""
    if rtol is not None:
        return rtol
    same = all(recorded.get(key) == found.get(key) for key in SAME_IF_EQUAL)
    return 0.0 if same else OTHER_ENVIRONMENT_RTOL


def write_golden(path: Path, golden: dict) -> None:
    """Write `golden` to `path`, indented, so that a commit that changes it shows which values
    moved."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(golden, indent=1) + "\n")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None


def load_golden(path: Path) -> dict:
    """A golden file `runner-repro --save` wrote, checked."""
    try:
        golden = json.loads(path.read_text())
    except OSError as error:
        raise UserError(
            f"cannot read the golden file {path}: {error.strerror}; write one with "
            f"runner-repro RUN_ID --save {path}"
        ) from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not a golden file: {error}") from None
    keys = golden if isinstance(golden, dict) else {}
    missing = [
        key for key in ("config", "environment", "metrics") if not isinstance(keys.get(key), dict)
    ]
    if missing:
        raise UserError(
            f"{path} is not a golden file: it lacks {', '.join(missing)} (a mapping each); "
            f"write one with runner-repro RUN_ID --save {path}"
        )
    if not isinstance(golden.get("overrides"), list):
        raise UserError(
            f"{path} records no overrides (an older runner-repro wrote it), so today's conf/ "
            f"cannot be checked against it: write it anew with runner-repro RUN_ID --save {path}"
        )
    golden["metrics"] = {
        key: [(int(step), float(value)) for step, value in points]
        for key, points in golden["metrics"].items()
    }
    return golden


def refuse_drift(path: Path, drift: list[tuple[str, object, object]]) -> None:
    """Refuse to rerun golden file `path` whose config `drift`s, (key, recorded, now) each, from
    the config today's conf/ composes."""
    if drift:
        raise UserError(
            f"{path}: today's config differs from the one it recorded, "
            f"{'; '.join(f'{key}: {was!r} -> {now!r}' for key, was, now in drift)}; not rerun. "
            f"After an intended change, rewrite it with runner-repro --golden {path} --update"
        )
