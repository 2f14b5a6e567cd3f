"""`hydra/sweeper=runner_optuna`'s settings, and its samplers (`hydra/sweeper/sampler=tpe`, ...).

The keys are those of Hydra's Optuna sweeper (hydra-optuna-sweeper 1.3), which this one replaced,
less `search_space` (Hydra 1.1's form of `params`) and the sampler arguments that Optuna has
deprecated since; plus `pruner`. Only Hydra is imported here: Hydra imports every plugin module
at each start of every command.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SamplerConf:
    _target_: str = MISSING


@dataclass
class TPESamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    # Optuna 5's TPE is multivariate by default; the stock sweeper's was not, and its seeded
    # searches (docs/pruning.md) proposed their points so.
    multivariate: bool = False


@dataclass
class RandomSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class GridSamplerConf(SamplerConf):
    """The grid is the searched space (choice or range), given when the sweep starts."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class CmaEsSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    n_startup_trials: int = 1
    independent_sampler: Any = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    use_separable_cma: bool = False


@dataclass
class NSGAIISamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class RunnerOptunaSweeperConf:
    _target_: str = "hydra_plugins.runner_optuna.resumable_sweeper.ResumableOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    # An Optuna sampler: hydra/sweeper/sampler=tpe (the default), random, grid, cmaes or nsgaii.
    sampler: SamplerConf = MISSING
    # minimize or maximize, or a list of them, one per value the jobs return.
    direction: Any = "minimize"
    # Where the study is kept: an Optuna storage URL such as sqlite:///optuna.db or
    # postgresql://USER@HOST/DB, or journal:PATH, Optuna's journal file, which several search
    # processes (on several machines, on a shared file system) can share; none keeps it in
    # memory, for this command only.
    storage: Any = None
    study_name: str | None = None
    # Finished (completed or pruned) trials the study should hold.
    n_trials: int = 20
    # Trials run at a time, in slots that do not wait for each other: each starts its next trial
    # as soon as its own ends (one at a time on the basic launcher, which runs jobs in-process).
    n_jobs: int = 2
    # The share of the trials ended (counted over at least n_jobs) that may fail before the
    # sweep stops.
    max_failure_rate: float = 0.0
    # The searched keys, in Hydra's sweep syntax: choice(...), range(...), interval(...),
    # tag(log, interval(...)).
    params: dict[str, str] | None = None
    # A function(config, trial) that suggests further parameters on each trial, by its dotted
    # path.
    custom_search_space: str | None = None
    # none, median or hyperband (Optuna's defaults), or a pruner's {_target_: ..., ...}.
    pruner: Any = "none"
    # Seconds a trial's workers hold it without renewing their lease (every sixth of it): a
    # trial whose workers are gone (killed, a node lost) is taken over and carried on from its
    # checkpoint by the next worker or rerun; at once where its workers ran on this machine or
    # in a requeued SLURM job, after lease_s elsewhere.
    lease_s: float = 120.0


_store = ConfigStore.instance()
_store.store(
    group="hydra/sweeper", name="runner_optuna", node=RunnerOptunaSweeperConf, provider="runner"
)
for _name, _node in [
    ("tpe", TPESamplerConf),
    ("random", RandomSamplerConf),
    ("grid", GridSamplerConf),
    ("cmaes", CmaEsSamplerConf),
    ("nsgaii", NSGAIISamplerConf),
]:
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="runner")
