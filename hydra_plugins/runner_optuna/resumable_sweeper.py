"""Hydra's Optuna sweeper, made resumable: `n_trials` counts the completed trials of the whole
study, so rerunning an interrupted search runs only the trials it still lacks.

The stock sweeper (hydra-optuna-sweeper) reloads a stored study but then runs `n_trials` more,
and its seeded sampler would propose the first trials' parameters again. Hydra only instantiates
sweepers from the `hydra_plugins` package, hence this module's home; it imports Optuna lazily
because Hydra imports every plugin module at each start.
"""

import logging
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        from optuna.trial import TrialState

        search = self.sweeper
        study = _stored_study(search.study_name, search.storage)
        if study is not None and study.trials:
            interrupted = [t.number for t in study.trials if t.state == TrialState.RUNNING]
            for number in interrupted:  # their process died: they will never report
                study.tell(number, state=TrialState.FAIL)
            done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
            wanted = search.n_trials
            search.n_trials = max(wanted - done, 0)
            # Fresh randomness, so the resumed search does not repeat the first proposals.
            if hasattr(search.sampler, "reseed_rng"):
                search.sampler.reseed_rng()
            log.info(
                "Resuming study %r: %d of %d trials completed, %d interrupted (marked failed); "
                "running %d more",
                search.study_name,
                done,
                wanted,
                len(interrupted),
                search.n_trials,
            )
        return super().sweep(arguments)


def _stored_study(name: str | None, storage: Any) -> Any:
    """The study as stored, or None if there is none yet."""
    import optuna

    if name is None or storage is None:
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet
        return None
