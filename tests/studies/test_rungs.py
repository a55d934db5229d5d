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


def test_successive_halving_stops_members_of_a_real_population_at_the_rungs() -> None:
    """The executor's wiring in miniature: join, report each epoch, ask the pruner, leave."""
    import core

    data = core.load_dataset("digits", seed=0)
    pruner = RungPruner(min_resource=1, reduction_factor=3, max_resource=6)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    trials = [study.ask() for _ in range(9)]
    io = core.data_params("dendritic_simple", data.input_shape, data.n_classes)
    configs = []
    for k, t in enumerate(trials):
        pruner.join(t.number)
        configs.append({**io, "n_neurons": 4 + k % 3, "n_dendrites": 3, "n_dendrite_inputs": 8,
                        "lr": [0.0003, 0.003, 0.03][k // 3], "seed": k})
    epochs: dict[int, int] = {}

    def on_epoch(i: int, epoch: int, metrics: dict[str, float]) -> bool:
        t = trials[i]
        epochs[t.number] = epoch
        t.report(metrics["val_accuracy"], epoch)
        return t.should_prune()

    def on_result(i: int, result: core.TrainResult) -> None:
        pruner.leave(trials[i].number)
        if result.status == "stopped":
            study.tell(trials[i], state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trials[i], result.history[-1]["val_accuracy"])

    core.train_population("dendritic_simple", configs, data, 6, batch_size=128, device="cpu",
                          on_epoch=on_epoch, on_result=on_result, population_size=9,
                          on_settle=lambda i: pruner.doomed(trials[i].number))
    at = {e: {t.number: t.intermediate_values[e] for t in study.trials if e in t.intermediate_values}
          for e in (1, 3)}
    out1 = pruner.decide(1, at[1])
    assert len(out1) >= 5, at[1]  # 9 -> 3 (ties at the cut go on)
    # Stopped at rung 1 itself (the trainer asks on_settle once every member has reported).
    assert all(epochs[n] == 1 for n in out1) and all(epochs[n] >= 3 for n in epochs if n not in out1)
    out3 = pruner.decide(3, at[3])
    assert out3 and set(at[3]) == set(epochs) - out1
    assert all(epochs[n] == 3 for n in out3) and all(epochs[n] == 6 for n in set(at[3]) - out3)
    assert len(study.get_trials(states=(optuna.trial.TrialState.PRUNED,))) == len(out1) + len(out3)


def test_the_spec_names_map_to_rung_pruners_over_the_study_epochs() -> None:
    import studies

    base = {"name": "r", "model": "dendritic_simple", "dataset": "digits", "n_epochs": 10,
            "model_params": {"n_dendrite_inputs": 8}}
    sha = RungPruner.for_spec(studies.StudySpec.model_validate({**base, "pruner": "successive_halving"}))
    assert sha.rungs() == [1, 3, 9] and sha.n_brackets == 1 and sha.direction == "maximize"
    hb = RungPruner.for_spec(studies.StudySpec.model_validate({**base, "pruner": "hyperband"}))
    assert hb.n_brackets == 3 and hb.rungs(1) == [3, 9] and hb.rungs(2) == [9]
    loss = RungPruner.for_spec(studies.StudySpec.model_validate(
        {**base, "pruner": "successive_halving", "objective": "val_loss"}))
    assert loss.direction == "minimize"
    with pytest.raises(ValueError, match="median"):
        RungPruner.for_spec(studies.StudySpec.model_validate({**base, "pruner": "median"}))


@pytest.mark.slow
def test_successive_halving_prunes_most_trials_of_a_population_study(tmp_path: object) -> None:
    """Through the real population executor, once make_pruner maps the names to RungPruner."""
    import studies

    spec = studies.StudySpec.model_validate({
        "name": "sha", "model": "dendritic_simple", "dataset": "digits", "max_params": 3000, "n_trials": 18,
        "n_epochs": 4, "batch_size": 128, "sampler": "random", "pruner": "successive_halving",
        "search_space": {"n_neurons": {"type": "int", "low": 4, "high": 10},
                         "n_dendrites": {"type": "int", "low": 2, "high": 6},
                         "n_dendrite_inputs": {"type": "int", "low": 4, "high": 16},
                         "lr": {"type": "float", "low": 0.0001, "high": 0.03, "log": True}}})
    assert isinstance(studies.make_pruner(spec), RungPruner)
    url = f"sqlite:///{tmp_path}/sha.db"
    studies.create_study(spec, url)
    study, spec = studies.load_study("sha", url)
    outs = studies.execute_population(study, spec, population_size=9, device="cpu")
    states = [o.state for o in outs]
    assert states.count("pruned") >= 0.6 * len(states), states
    ran = [len(t.intermediate_values) for t in study.trials]
    assert sum(ran) < 0.6 * 4 * len(ran), ran  # well under every trial's full 4 epochs
    # every pruned member stopped on a rung (epochs 1 and 3), none an epoch late
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(len(t.intermediate_values) in (1, 3) for t in pruned), \
        [len(t.intermediate_values) for t in pruned]
    sizes = {t.user_attrs.get("population_size") for t in study.trials if not studies.is_infeasible(t)}
    assert sizes and all(isinstance(k, int) and 1 <= k <= 9 for k in sizes), sizes
    assert max(sizes) > 1  # members trained together
