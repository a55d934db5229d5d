"""FastMedianPruner decides as Optuna's MedianPruner, report for report."""

from __future__ import annotations

import random

import optuna
import pytest

from studies._fast import FastMedianPruner


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_every_report_gets_optunas_median_pruner_decision(direction: str) -> None:
    """A population's pattern: many running trials report the same step in a row, trials
    complete between steps (which must refresh the median), some report NaN, some skip steps."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(0)
    study = optuna.create_study(direction=direction)
    kwargs = dict(n_startup_trials=5, n_warmup_steps=2, interval_steps=2)
    ours, theirs = FastMedianPruner(**kwargs), optuna.pruners.MedianPruner(**kwargs)
    decided = pruned = 0
    for _cohort in range(4):
        trials = [study.ask() for _ in range(40)]
        speed = {t.number: rng.random() for t in trials}
        for step in range(8):
            for t in trials:
                if rng.random() < 0.1:  # skips this step
                    continue
                value = float("nan") if rng.random() < 0.02 else speed[t.number] * step + rng.gauss(0, 0.3)
                t.report(value, step)
                frozen = study._storage.get_trial(t._trial_id)
                got, want = ours.prune(study, frozen), theirs.prune(study, frozen)
                assert got == want, (t.number, step)
                decided += 1
                pruned += got
            if step == 4:  # some complete mid-cohort: the next reports see a new median
                for t in trials[:5]:
                    study.tell(t, speed[t.number])
                trials = trials[5:]
        for t in trials:
            study.tell(t, speed[t.number])
    assert decided > 800 and 0 < pruned < decided  # both kinds of decision were compared


def test_the_median_is_computed_once_per_step_while_the_completed_trials_stay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from studies import _optuna_private

    calls = []
    first, best, percentile = _optuna_private.percentile_pruner_parts()

    def counting(*args: object) -> float:
        calls.append(args[2])  # the step
        return percentile(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(_optuna_private, "percentile_pruner_parts", lambda: (first, best, counting))
    study = optuna.create_study(direction="maximize")
    for i in range(6):
        t = study.ask()
        t.report(float(i), 3)
        study.tell(t, float(i))
    pruner = FastMedianPruner(n_startup_trials=5, n_warmup_steps=0)
    running = [study.ask() for _ in range(10)]
    for t in running:
        t.report(1.0, 3)
        pruner.prune(study, study._storage.get_trial(t._trial_id))
    assert calls == [3]
    study.tell(running[0], 9.0)  # a trial completes: the median is computed anew
    pruner.prune(study, study._storage.get_trial(running[1]._trial_id))
    assert calls == [3, 3]


def test_a_median_of_other_trials_never_lands_among_the_current_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads: one computes the median of the completed trials it saw while a trial
    completes and the other memoizes the new set's median; the first one's must not replace it."""
    from studies import _optuna_private

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first, best, percentile = _optuna_private.percentile_pruner_parts()
    study = optuna.create_study(direction="maximize")
    for v in range(5):  # completed at step 3: 0 .. 4, median 2
        t = study.ask()
        t.report(float(v), 3)
        study.tell(t, float(v))
    extra, a, b = study.ask(), study.ask(), study.ask()
    extra.report(100.0, 3)
    a.report(1.0, 3)
    b.report(2.2, 3)  # above the old median (2), below the new one (2.5 with extra completed)
    pruner = FastMedianPruner(n_startup_trials=1, n_warmup_steps=0)
    inner: list[bool] = []

    def interleaved(*args: object) -> float:
        value = percentile(*args)
        if not inner:  # meanwhile: extra completes and another report is decided
            inner.append(True)
            study.tell(extra, 100.0)
            pruner.prune(study, study._storage.get_trial(b._trial_id))
        return value  # type: ignore[no-any-return]

    monkeypatch.setattr(_optuna_private, "percentile_pruner_parts", lambda: (first, best, interleaved))
    pruner.prune(study, study._storage.get_trial(a._trial_id))
    assert inner
    frozen = study._storage.get_trial(b._trial_id)
    want = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0).prune(study, frozen)
    assert want and pruner.prune(study, frozen)
