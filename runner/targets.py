"""Objects built from config nodes that name a `_target_`: models, optimizers, losses, data
loaders and callbacks, the runner's own and a user's alike.

`hydra.utils.instantiate` does the building. Before it calls anything, `build` checks what
Hydra leaves to the callable: that the target imports, and that each key the config gives is a
parameter of it, of the annotated type. Each failure is one line naming the config key, so a
misspelt key or a broken builder is told before training, not as a traceback from inside it.
"""

import importlib
import importlib.util
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from runner.errors import UserError


def importable_from_cwd() -> None:
    """Let a target name a module in the folder the command runs from, as `python -m` does."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def code_of(name: str) -> tuple[str, str | None]:
    """The module that the model's `_target_` `name` names, and the folder it was imported from
    (None for one without a file): what a saved model records for `import_code`."""
    module = _import_longest(name, "model")[0].__name__
    file = getattr(sys.modules[module.partition(".")[0]], "__file__", None)
    if file is None:
        return module, None
    path = Path(file)
    return module, str(path.parent.parent if path.stem == "__init__" else path.parent)


def import_code(name: str, folder: str | None = None, near: str | None = None) -> None:
    """Import what `name` (the model's `_target_`, or the module a logged model records) names,
    before loading a saved model: Keras knows a subclassed model's class, or a custom layer,
    only once its module has run."""
    check_importable(name, folder, near)
    _import_longest(name, "model")


def check_importable(name: str, folder: str | None = None, near: str | None = None) -> None:
    """Refuse, without importing it (which may load Keras before the backend is chosen), a
    module that the working folder does not hold, in one line naming the folder to run from:
    `folder`, where training imported it, else the nearest one above `near` (a checkpoint
    folder) that holds it."""
    top = name.partition(".")[0]
    if importlib.util.find_spec(top) is None:
        folder = folder or _holder(top, near)
        where = (
            f"run from {folder}, where the model was trained"
            if folder and Path(folder) != Path.cwd()
            else f"run from the folder that holds {top}.py or {top}/, as training did"
        )
        raise UserError(
            f"the model needs its module {top}, which cannot be imported from {Path.cwd()}: {where}"
        )


def _holder(module: str, near: str | None) -> str | None:
    """The nearest folder above `near` that holds `module` as a file or a package."""
    if not near:
        return None
    for folder in Path(near).resolve().parents:
        if (folder / f"{module}.py").is_file() or (folder / module / "__init__.py").is_file():
            return str(folder)
    return None


def target(node: Mapping[str, Any], path: str) -> Callable:
    """The callable `node`'s `_target_` names, imported: the longest prefix of the dotted name that
    is a module, then attributes. Hydra's own lookup logs its failures before raising them and
    calls a missing attribute a missing module."""
    name = node.get("_target_")
    if not name:
        raise UserError(f"{path} names no _target_: set {path}._target_=<module>.<callable>")
    module, attributes = _import_longest(str(name), path)
    found: Any = module
    for attribute in attributes:
        if not hasattr(found, attribute):
            raise UserError(
                f"{path}._target_={name}: {found.__name__} holds no {attribute!r}, neither a "
                f"module nor an attribute"
            )
        found = getattr(found, attribute)
    if not callable(found):
        raise UserError(f"{path}._target_={name} is a {type(found).__name__}, not a callable")
    return found


def _import_longest(name: str, path: str) -> tuple[types.ModuleType, list[str]]:
    """The longest prefix of the dotted `name` that is a module, imported, and the names after
    it. `path` is the config key that gives `name`, for messages."""
    parts = name.split(".")
    module, end = None, 0
    for end in range(1, len(parts) + 1):  # each package, then what it holds
        prefix = ".".join(parts[:end])
        try:
            module = importlib.import_module(prefix)
        except ModuleNotFoundError as missing:
            if missing.name != prefix or module is None:  # a module it imports is missing too
                raise UserError(
                    f"{path}._target_={name} cannot be imported ({missing}): check the name, "
                    f"and that its module is in the folder you run from or installed"
                ) from None
            end -= 1
            break
        except Exception as broken:  # the module exists and fails to import (a syntax error)
            raise UserError(
                f"{path}._target_={name}: importing {prefix} raised "
                f"{type(broken).__name__}: {_first_line(broken)}"
            ) from None
    return module, parts[end:]


def label(node: Mapping[str, Any]) -> str:
    """What runs are tagged and named by: the option's `name`, else its target's own name."""
    return str(node.get("name") or str(node.get("_target_", "")).rsplit(".", 1)[-1])


def arguments(node: Mapping[str, Any], runner_keys: Iterable[str] = ()) -> dict[str, Any]:
    """The keys of `node` that go to its target: all but `_target_` and the runner's own."""
    skip = {"_target_", *runner_keys}
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return {key: value for key, value in values.items() if key not in skip}


def build(
    node: Mapping[str, Any],
    path: str,
    runner_keys: Iterable[str] = (),
    passed: dict[str, Any] | None = None,
    **given: Any,
) -> Any:
    """Call `node["_target_"]` with `node`'s keys (less `runner_keys`), `given` (what the runner
    supplies, such as `input_shape`) and those of `passed` that the target takes. `path` is the
    node's place in the config (`model`, `callbacks.early_stopping`), for messages."""
    from hydra.utils import instantiate

    function = target(node, path)
    kwargs = arguments(node, runner_keys)
    accepted = _parameters(function)
    offered = {**given, **{k: v for k, v in (passed or {}).items() if _takes(accepted, k)}}
    check_arguments(function, kwargs, path, offered)
    kwargs = {key: _as_float(function, accepted, key, value) for key, value in kwargs.items()}
    try:
        # Partial, then called: what the runner gives (a shape tuple, arrays) reaches the target
        # as it is, not converted to a config node.
        built = instantiate(
            {"_target_": node["_target_"], "_partial_": True, **kwargs}, _convert_="all"
        )
        return built(**offered)
    except UserError:
        raise
    except Exception as error:
        cause = error.__cause__ if _is_hydra_wrapper(error) and error.__cause__ else error
        message = _first_line(cause)
        # A target that takes **kwargs refuses unknown keys only when called (Keras's classes).
        hint = (
            f"; {path}'s keys all go to its _target_: remove one with ~{path}.KEY, or start "
            f"from an option whose keys it takes"
            if "not recognized" in message or "unexpected keyword" in message
            else ""
        )
        raise UserError(
            f"{path}: {node['_target_']} raised {type(cause).__name__}: {message}{hint}"
        ) from None


def check_arguments(
    function: Callable, kwargs: dict[str, Any], path: str, given: dict[str, Any] | None = None
) -> None:
    """Refuse a key that `function` does not take, a value of another type than its annotation,
    and a parameter without default that neither the config nor the runner gives."""
    parameters = _parameters(function)
    if parameters is None:
        return
    named = {n: p for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    name = _qualified(function)
    for key in given or {}:
        if key not in named and not open_ended:
            raise UserError(
                f"{path}: {name} must take {' and '.join(given)}, which the runner passes it; "
                f"add them to its parameters"
            )
    for key, value in kwargs.items():
        if key not in named:
            if open_ended:
                continue
            takes = ", ".join(k for k in named if k not in (given or {})) or "no keys"
            raise UserError(
                f"{path}.{key} is not a parameter of {name} (it takes: {takes}); correct or "
                f"remove it"
            )
        expected = _annotation(function, key)
        if expected is not None and not _fits(value, expected):
            raise UserError(
                f"{path}.{key}={value!r} is not of type {_type_name(expected)}, as {name} expects"
            )
    for key, parameter in named.items():
        supplied = key in kwargs or key in (given or {})
        if parameter.default is parameter.empty and not supplied:
            raise UserError(f"{path}.{key} is missing: {name} needs it; add +{path}.{key}=VALUE")


def _as_float(
    function: Callable, parameters: dict[str, inspect.Parameter] | None, key: str, value: Any
) -> Any:
    """`value`, as a float where it is an integer given for a float parameter (annotated so, or
    with a float default): Keras refuses `learning_rate=1` or `momentum=1` ("should be float"),
    which YAML and the command line read as integers."""
    if not isinstance(value, int) or isinstance(value, bool) or not parameters:
        return value
    parameter = parameters.get(key)
    if parameter is None:
        return value
    expected = _annotation(function, key)
    if expected is None:
        wanted = isinstance(parameter.default, float)
    else:
        union = typing.get_origin(expected) in (typing.Union, types.UnionType)
        options = typing.get_args(expected) if union else (expected,)
        wanted = float in options and int not in options
    return float(value) if wanted else value


def _parameters(function: Callable) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # some builtins have no signature to check against
        return None


def _takes(parameters: dict[str, inspect.Parameter] | None, key: str) -> bool:
    return parameters is not None and key in parameters


def _annotation(function: Callable, key: str) -> Any:
    owner = function.__init__ if inspect.isclass(function) else function
    try:
        return typing.get_type_hints(owner).get(key)
    except Exception:  # annotations that do not evaluate here are left unchecked
        return None


_SIMPLE = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _fits(value: Any, expected: Any) -> bool:
    """Whether `value` matches `expected`, checked for the simple types a config holds;
    anything else passes."""
    if expected is Any:
        return True
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected in _SIMPLE:
        if isinstance(value, bool) and expected is not bool:
            return False
        return isinstance(value, _SIMPLE[expected])
    origin = typing.get_origin(expected) or expected
    if origin in (tuple, list):
        return isinstance(value, list | tuple)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


def _qualified(function: Callable) -> str:
    return f"{function.__module__}.{function.__qualname__}"


def _is_hydra_wrapper(error: Exception) -> bool:
    from hydra.errors import InstantiationException

    return isinstance(error, InstantiationException)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
