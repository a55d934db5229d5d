"""Synchronous successive halving at rungs: the rule, single-trial mode, and a population's cohorts."""

from __future__ import annotations

import math

import optuna
import pytest

from studies._rungs import RungPruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_rungs_are_r_times_powers_of_eta_below_the_last_epoch() -> None:
    p = RungPruner(min_resource=1, reduction_factor=3, max_resource=20)
    assert p.rungs() == [1, 3, 9]
    assert [e for e in range(1, 25) if p.is_rung(e)] == [1, 3, 9]
    assert RungPruner(min_resource=2, reduction_factor=2).rungs(up_to=17) == [2, 4, 8, 16]


def test_nine_members_eta_3_six_stop_at_rung_1_then_two_at_rung_3() -> None:
    p = RungPruner(min_resource=1, reduction_factor=3, max_resource=20)
    values = {n: 0.1 * n for n in range(9)}  # trial 8 best
    stop1 = p.decide(1, values)
    assert stop1 == {0, 1, 2, 3, 4, 5}
    left = {n: values[n] for n in values if n not in stop1}
    # The stopped six have no value at epoch 3: only the three survivors meet there.
    assert p.decide(3, left, {}) == {6, 7}
    assert p.decide(2, values) == set(), "epoch 2 is no rung"
    assert p.decide(9, {8: 0.9}, {}) == set(), "the last survivor goes on"


def test_minimize_keeps_the_lowest_values() -> None:
    p = RungPruner(reduction_factor=3, direction="minimize")
    assert p.decide(1, {n: float(n) for n in range(9)}) == {3, 4, 5, 6, 7, 8}


def test_ties_at_the_cut_survive() -> None:
    p = RungPruner(reduction_factor=3)
    assert p.decide(1, dict.fromkeys(range(9), 0.5)) == set()
    # Two share the top value, one is alone below: with 3 in the pool one goes on, so both
    # tied members survive and only the lower one stops.
    assert p.decide(1, {0: 0.9, 1: 0.9, 2: 0.1}) == {2}


def test_finished_trials_values_at_the_rung_count() -> None:
    p = RungPruner(reduction_factor=3)
    history = {10 + i: 0.8 + 0.01 * i for i in range(6)}
    # Alone, a member is never stopped; among six better finished trials it is.
    assert p.decide(1, {0: 0.5}) == set()
    assert p.decide(1, {0: 0.5}, history) == {0}
    assert p.decide(1, {0: 0.99}, history) == set()


def test_non_finite_values_always_stop() -> None:
    p = RungPruner(reduction_factor=3)
    assert p.decide(1, {0: math.nan, 1: 0.5}) == {0}
    assert p.decide(1, {0: math.nan}) == {0}


def test_bootstrap_count_holds_back_small_rungs() -> None:
    p = RungPruner(reduction_factor=2, bootstrap_count=4)
    assert p.decide(1, {0: 0.1, 1: 0.9}) == set()
    assert p.decide(1, {0: 0.1, 1: 0.9, 2: 0.8, 3: 0.7}) == {0, 3}


def test_hyperband_brackets_start_eta_times_later_and_rank_apart() -> None:
    p = RungPruner(min_resource=1, reduction_factor=3, max_resource=27, hyperband=True)
    assert p.n_brackets == 4  # first rungs at 1, 3, 9 and 27 (the last never stops anyone)
    assert p.rungs(0) == [1, 3, 9] and p.rungs(1) == [3, 9] and p.rungs(2) == [9] and p.rungs(3) == []
    # At epoch 1 only bracket 0 (numbers 0, 4, 8, ...) is ranked.
    values = {n: float(n) for n in range(12)}
    assert p.decide(1, values) == {0, 4}
    # At epoch 3 brackets 0 and 1 are ranked, each within itself.
    assert p.decide(3, values) == {0, 4, 1, 5}


@pytest.mark.parametrize("kwargs", [
    {"min_resource": 0}, {"reduction_factor": 1}, {"max_resource": 0}, {"hyperband": True},
    {"direction": "up"}, {"bootstrap_count": -1},
])
def test_bad_arguments_are_value_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RungPruner(**kwargs)  # type: ignore[arg-type]


def _report(study: optuna.Study, trial: optuna.Trial, step: int, value: float) -> bool:
    trial.report(value, step)
    return trial.should_prune()


def test_single_trial_mode_ranks_against_the_others_intermediate_values() -> None:
    pruner = RungPruner(min_resource=1, reduction_factor=3, max_resource=10)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for v in (0.7, 0.8, 0.9):
        t = study.ask()
        assert not _report(study, t, 1, v) or v == 0.7
        study.tell(t, v)
    bad = study.ask()
    assert _report(study, bad, 1, 0.1), "below the best third of four at rung 1"
    good = study.ask()
    assert not _report(study, good, 1, 0.95)
    assert not _report(study, good, 2, 0.0), "epoch 2 is no rung"


def test_a_population_cohort_stops_exactly_its_bottom_two_thirds() -> None:
    pruner = RungPruner(min_resource=1, reduction_factor=3, max_resource=10)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    trials = [study.ask() for _ in range(9)]
    for t in trials:
        pruner.join(t.number)
    values = [0.5, 0.9, 0.1, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6]  # best three: trials 1, 4, 6
    stopped_at_1 = {t.number for t, v in zip(trials, values, strict=True) if _report(study, t, 1, v)}
    # The first members to report cannot know yet; each is stopped at the rung once its fate
    # no longer depends on the rest, otherwise at the next epoch.
    alive = [t for t in trials if t.number not in stopped_at_1]
    stopped_at_2 = {t.number for t in alive if _report(study, t, 2, 0.5)}
    assert stopped_at_1 | stopped_at_2 == {0, 2, 3, 5, 7, 8}
    assert len(stopped_at_1) >= 3, "most stops happen at the rung itself"
    for t in trials:
        if t.number in stopped_at_1 | stopped_at_2:
            pruner.leave(t.number)
    # A single-trial run after the population is ranked against all nine values at rung 1.
    late = study.ask()
    assert _report(study, late, 1, 0.65)
    assert not _report(study, study.ask(), 1, 0.85)
