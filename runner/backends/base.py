"""What a backend offers the runner (`Backend`), and the part both backends share: the clean
start of a run, the pinned requirements of a saved model, the refusal of a CPU split that
comes too late. A run's backend is the instance `runner.backends.select` returns, handed down
to whatever computes with it."""

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from importlib.metadata import version
from types import ModuleType
from typing import Any

import numpy as np

from runner.backends.devices import Devices, Plan
from runner.data import Split
from runner.errors import UserError


class Backend(ABC):
    """One of Keras's backends, as the runner uses it. Each subclass imports its framework
    in `load`, once `select` has chosen it, and its methods take it from one handle of its
    module (`keras_module` for Keras), so that choosing a backend loads nothing else; one that
    lacks a method cannot be made (abstract methods), so it fails at `select`, not mid-run."""

    name: str  # as in `backend=...` and KERAS_BACKEND
    packages: tuple[str, ...]  # whose versions decide a run's numbers, besides Keras's own

    @abstractmethod
    def load(self, device: Any = None) -> None:
        """Import the framework, with what `device` says must be set before it starts."""

    @abstractmethod
    def physical_devices(self) -> list[str]:
        """Every device the framework found, as `CPU:0`, `GPU:0`, ..."""

    @abstractmethod
    def detect(self, cpu_devices: int = 1) -> Devices:
        """The devices the framework sees, the CPU split into `cpu_devices` logical devices."""

    def requirements(self) -> list[str]:
        """The pip requirements of a model this backend saved."""
        return [f"{package}=={version(package)}" for package in self.packages]

    def start_clean(self, seed: int, deterministic: bool, plan: Plan) -> None:
        """Forget what earlier runs in this process left behind, set the dtype policy and the
        distribution `plan` names, then seed everything, with op determinism if
        `deterministic`. The joblib launcher reuses worker processes between sweep jobs, and
        Keras and its framework keep global state (graph names, dtype policy, distribution,
        seeds, the determinism flag) across them."""
        keras = keras_module()
        keras.backend.clear_session()
        keras.config.set_dtype_policy(plan.precision)
        self._distribute(plan)
        keras.utils.set_random_seed(seed)
        self._determinism(deterministic)

    @abstractmethod
    def _distribute(self, plan: Plan) -> None:
        """Set the distribution over devices `plan` names for the whole process, if the
        backend keeps one there."""

    @abstractmethod
    def _determinism(self, deterministic: bool) -> None:
        """Turn the framework's op determinism on or off, if it has a switch for it."""

    @abstractmethod
    def build_scope(self, plan: Plan) -> AbstractContextManager:
        """The scope the model is built in, for the distribution `plan` names."""

    @abstractmethod
    def training_dataset(
        self, split: Split, batch_size: int, seed: int, start_step: int = 0
    ) -> Any:
        """Endless batches of `split` in a seeded order, from `start_step` on."""

    @abstractmethod
    def in_batches(self, split: Split, batch_size: int, labels: bool = True) -> Any:
        """`split` in order, in batches, for Keras's `evaluate` and `predict`."""

    @abstractmethod
    def every_nth_batch(
        self, *, n: int, batch_size: int, seed: int, every: int, start_step: int
    ) -> Iterator[np.ndarray]:
        """The example indices of the batches trained at steps every, 2 * every, ... after
        `start_step`: what a callback acting every `every` steps needs of the training
        order."""

    @abstractmethod
    def has_gpu(self) -> bool:
        """Whether the framework trains on a GPU."""

    @abstractmethod
    def reset_gpu_peak(self) -> None:
        """Start `gpu_peak_mb`'s count again, where the framework can."""

    @abstractmethod
    def gpu_peak_mb(self) -> float:
        """The most memory the framework held on the first GPU since `reset_gpu_peak`."""


@functools.cache
def keras_module() -> ModuleType:
    """Keras, imported once a process, on the backend `runner.backends.select` chose: the
    backend's `load` imported it or its framework first."""
    import keras

    return keras


def cpu_split_refused(count: int, why: str) -> UserError:
    """The refusal of `device.cpu_devices=count` in a process whose framework set up its
    devices already, for the reason `why`."""
    return UserError(
        f"device.cpu_devices={count} cannot take effect: {why}; run it in a new process"
    )
