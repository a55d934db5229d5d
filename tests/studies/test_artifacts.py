"""studies.ModelStore.keep: the ``keep`` best trials of a study, and no write for the others."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch

from studies import ModelStore, _artifacts

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WEIGHTS = {"w": torch.ones(3)}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ModelStore]:
    if request.param == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'models.db'}")
    else:
        engine = sa.create_engine(PG_URL)
        try:
            engine.connect().close()
        except sa.exc.OperationalError:
            pytest.skip("the local PostgreSQL server is not running")
    yield ModelStore(engine)
    engine.dispose()


@pytest.fixture
def study(store: ModelStore) -> Iterator[Callable[[], str]]:
    """A fresh study name per call, its models deleted after (PostgreSQL's database stays)."""
    names: list[str] = []

    def new() -> str:
        names.append(f"s-{random.random()}")
        return names[-1]

    yield new
    for name in names:
        store.delete_study(name)


def _keep(store: ModelStore, name: str, number: int, value: float | None, keep: int,
          maximize: bool, **config: Any) -> bool:
    return store.keep(name, number, value, {"family": "f", **config}, WEIGHTS, keep,
                      maximize=maximize)


def _values(store: ModelStore, name: str) -> dict[int, float | None]:
    t = _artifacts._MODELS
    with store.engine.connect() as con:
        rows = con.execute(sa.select(t.c.trial_number, t.c.value).where(t.c.study_name == name))
        return {n: v for n, v in rows}


def _created(store: ModelStore, name: str) -> dict[int, float]:
    t = _artifacts._MODELS
    with store.engine.connect() as con:
        rows = con.execute(sa.select(t.c.trial_number, t.c.created).where(t.c.study_name == name))
        return {n: c for n, c in rows}


class _Spy:
    """Counts torch.save calls in the module and the SQL statements the engine runs."""

    def __init__(self) -> None:
        self.saves = 0
        self.statements: list[str] = []

    def reset(self) -> None:
        self.saves, self.statements = 0, []


@pytest.fixture
def spy(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Spy]:
    """Counting starts when a test asks for it (after its setup keeps, with `reset`)."""
    out = _Spy()
    real = torch.save

    def save(*args: Any, **kwargs: Any) -> None:
        out.saves += 1
        real(*args, **kwargs)

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        out.statements.append(statement.lstrip().split(None, 1)[0].upper())

    monkeypatch.setattr(_artifacts.torch, "save", save)
    sa.event.listen(store.engine, "before_cursor_execute", record)
    yield out
    sa.event.remove(store.engine, "before_cursor_execute", record)


# -- (1) the best `keep` stay, in any arrival order -------------------------------------------
@pytest.mark.parametrize("maximize", [True, False])
@pytest.mark.parametrize("arrival", ["increasing", "decreasing", "random"])
def test_ten_trials_keep_exactly_the_best_three(
    store: ModelStore, study: Callable[[], str], maximize: bool, arrival: str,
) -> None:
    name = study()
    values = [0.1 * (i + 1) for i in range(10)]
    numbers = list(range(10))
    if arrival == "decreasing":
        numbers.reverse()
    elif arrival == "random":
        random.Random(3).shuffle(numbers)
    ranked = sorted(range(10), key=lambda n: -values[n] if maximize else values[n])
    returned = {}
    for n in numbers:
        returned[n] = _keep(store, name, n, values[n], 3, maximize)
        # True exactly when it is among the best 3 of those seen so far
        seen = [m for m in ranked if m in returned]
        assert returned[n] == (n in seen[:3]), (n, returned)
        assert set(store.list(name)) == set(seen[:3])
    assert sorted(store.list(name)) == sorted(ranked[:3])
    assert _values(store, name) == {n: values[n] for n in ranked[:3]}


def test_studies_are_kept_apart(store: ModelStore, study: Callable[[], str]) -> None:
    a, b = study(), study()
    for n in range(4):
        _keep(store, a, n, 10.0 + n, 2, True)
    assert _keep(store, b, 0, 0.0, 2, True)  # b is empty: a's better models don't count
    assert _keep(store, b, 1, -1.0, 2, True)
    assert not _keep(store, b, 2, -2.0, 2, True)
    assert sorted(store.list(a)) == [2, 3] and sorted(store.list(b)) == [0, 1]


# -- (2) a trial that cannot enter costs one read ---------------------------------------------
@pytest.mark.parametrize("maximize", [True, False])
def test_a_trial_worse_than_the_kept_ones_is_one_read_and_no_save(
    store: ModelStore, study: Callable[[], str], spy: _Spy, maximize: bool,
) -> None:
    name = study()
    sign = 1.0 if maximize else -1.0
    for n in range(3):
        assert _keep(store, name, n, sign * (n + 1), 3, maximize)
    created = _created(store, name)
    spy.reset()
    assert not _keep(store, name, 3, sign * 0.5, 3, maximize)  # worse than all three
    assert spy.saves == 0
    assert spy.statements == ["SELECT"], spy.statements
    assert _created(store, name) == created
    # still the same path for one that does enter: saved, written, and the worst pushed out
    spy.reset()
    assert _keep(store, name, 4, sign * 2.5, 3, maximize)
    assert spy.saves == 1 and "INSERT" in spy.statements
    assert sorted(store.list(name)) == [1, 2, 4]
    # a study with fewer than `keep` models takes anything
    other = study()
    assert _keep(store, other, 0, sign * -100.0, 3, maximize)


@pytest.mark.parametrize("maximize", [True, False])
def test_a_burst_behind_the_bar_costs_one_read_and_a_better_one_still_enters(
    store: ModelStore, study: Callable[[], str], spy: _Spy, maximize: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A population's members end ~1,000 at once: those behind the keep-th model share a read."""
    name = study()
    sign = 1.0 if maximize else -1.0
    for n in range(3):
        assert _keep(store, name, n, sign * (n + 1), 3, maximize)
    spy.reset()
    for n in range(3, 53):
        assert not _keep(store, name, n, sign * (0.9 - n / 100), 3, maximize)
    assert spy.saves == 0 and spy.statements == ["SELECT"], spy.statements
    # one that ranks before the remembered bar reads and enters; the bar is read afresh after
    spy.reset()
    assert _keep(store, name, 60, sign * 1.5, 3, maximize)
    assert spy.saves == 1 and sorted(store.list(name)) == [1, 2, 60]
    spy.reset()
    assert not _keep(store, name, 61, sign * 1.2, 3, maximize)  # behind the new bar (1.5)
    assert not _keep(store, name, 62, sign * 1.1, 3, maximize)
    assert spy.statements == ["SELECT"], spy.statements
    # another worker's better models raise the bar: our remembered one only reads more often
    other = ModelStore(store.engine)
    assert _keep(other, name, 70, sign * 5.0, 3, maximize)
    assert _keep(other, name, 71, sign * 6.0, 3, maximize)
    assert not _keep(store, name, 72, sign * 1.7, 3, maximize)  # was past our bar, not theirs
    assert sorted(store.list(name)) == [2, 70, 71]
    # and an old bar is read again
    monkeypatch.setattr(_artifacts, "_BAR_SECONDS", 0.0)
    spy.reset()
    assert not _keep(store, name, 80, sign * 0.1, 3, maximize)
    assert not _keep(store, name, 81, sign * 0.1, 3, maximize)
    assert spy.statements == ["SELECT", "SELECT"], spy.statements


def test_a_remembered_bar_never_stops_a_re_keep(store: ModelStore, study: Callable[[], str]) -> None:
    name = study()
    for n, v in enumerate((0.9, 0.8)):
        assert _keep(store, name, n, v, 2, True)
    assert not _keep(store, name, 3, 0.1, 2, True)  # reads: the bar is (0.8, trial 1)
    assert _keep(store, name, 1, 0.05, 2, True, again=True)  # behind the bar, but kept before
    assert _values(store, name) == {0: 0.9, 1: 0.05}
    assert _keep(store, name, 4, 0.5, 2, True)  # the bar fell with the re-keep
    assert _values(store, name) == {0: 0.9, 4: 0.5}


def test_keep_zero_keeps_nothing(store: ModelStore, study: Callable[[], str], spy: _Spy) -> None:
    name = study()
    assert not _keep(store, name, 0, 1.0, 0, True)
    assert spy.saves == 0 and spy.statements == [] and store.list(name) == []


def test_keeping_a_kept_trial_again_stores_its_new_value(
    store: ModelStore, study: Callable[[], str],
) -> None:
    """A re-keep of a stored trial replaces it even when its new value is worse than the rest."""
    name = study()
    assert _keep(store, name, 0, 0.9, 2, True)
    assert _keep(store, name, 1, 0.8, 2, True)
    assert _keep(store, name, 1, 0.1, 2, True, again=True)
    assert _values(store, name) == {0: 0.9, 1: 0.1}
    assert store.get(name, 1)[0]["again"] is True  # type: ignore[index]
    assert not _keep(store, name, 2, 0.05, 2, True)
    assert _keep(store, name, 3, 0.5, 2, True)
    assert _values(store, name) == {0: 0.9, 3: 0.5}


# -- (3) ties: the smaller trial number ranks first -------------------------------------------
@pytest.mark.parametrize("maximize", [True, False])
def test_ties_go_to_the_smaller_trial_number(
    store: ModelStore, study: Callable[[], str], spy: _Spy, maximize: bool,
) -> None:
    name = study()
    better = 1.0 if maximize else 0.0
    assert _keep(store, name, 5, 0.5, 3, maximize)
    assert _keep(store, name, 7, 0.5, 3, maximize)
    assert _keep(store, name, 3, better, 3, maximize)
    spy.reset()
    assert not _keep(store, name, 8, 0.5, 3, maximize)  # ties 5 and 7, comes after both
    assert spy.saves == 0 and spy.statements == ["SELECT"]
    assert _keep(store, name, 6, 0.5, 3, maximize)  # ties 7 with a smaller number: 7 goes
    assert sorted(store.list(name)) == [3, 5, 6]
    assert _keep(store, name, 1, 0.5, 3, maximize)  # and now 6 goes
    assert sorted(store.list(name)) == [1, 3, 5]
    assert _keep(store, name, 2, 0.5, 3, maximize)  # smaller than 5, which goes
    assert not _keep(store, name, 4, 0.5, 3, maximize)  # larger than 2
    assert sorted(store.list(name)) == [1, 2, 3]


# -- (4) a value of None (or NaN) ranks where the database sorts NULL -------------------------
# The ranking is `ORDER BY value {DESC|ASC}, trial_number`. SQLite sorts NULL before every
# number (last when maximizing, first when minimizing); PostgreSQL after every number (first
# when maximizing, last when minimizing). SQLite stores NaN as NULL; PostgreSQL sorts NaN after
# every number but before NULL. Pinned as the store behaved before keep() learnt to skip the
# write for a trial that cannot enter.
_NULL_HIGH = {"sqlite": False, "postgresql": True}


@pytest.mark.parametrize("maximize", [True, False])
def test_a_none_value_ranks_where_the_database_sorts_null(
    store: ModelStore, study: Callable[[], str], maximize: bool,
) -> None:
    dialect = store.engine.dialect.name
    null_first = _NULL_HIGH[dialect] == maximize  # NULL ranks before every number
    sign = 1.0 if maximize else -1.0
    # three numbers kept, then None, then a number worse than all
    a = study()
    for n in range(3):
        _keep(store, a, n, sign * (n + 5), 3, maximize)
    assert _keep(store, a, 3, None, 3, maximize) == null_first
    assert not _keep(store, a, 4, sign * 1.0, 3, maximize)
    assert sorted(store.list(a)) == ([1, 2, 3] if null_first else [0, 1, 2])
    # None fills the kept set, then numbers arrive
    b = study()
    assert _keep(store, b, 0, None, 2, maximize)
    assert _keep(store, b, 1, None, 2, maximize)
    assert _keep(store, b, 2, sign * 1.0, 2, maximize) == (not null_first)
    assert not _keep(store, b, 3, None, 2, maximize)  # ties NULL 0 (and 1) with a larger number
    assert _values(store, b) == ({0: None, 1: None} if null_first else {0: None, 2: sign * 1.0})
    if not null_first:
        assert _keep(store, b, 4, sign * 0.5, 2, maximize)  # any number beats the NULL
        assert _values(store, b) == {2: sign * 1.0, 4: sign * 0.5}
    # one None and one number kept: a worse number and a later None
    c = study()
    assert _keep(store, c, 0, sign * 1.0, 2, maximize)
    assert _keep(store, c, 1, None, 2, maximize)
    # after NULL 1 either way, but before the number 1.0 when NULL ranks first
    assert _keep(store, c, 2, None, 2, maximize) == null_first
    # beats the number 1.0, but not the NULLs when they rank first
    assert _keep(store, c, 3, sign * 2.0, 2, maximize) == (not null_first)
    assert sorted(store.list(c)) == ([1, 2] if null_first else [0, 3])


@pytest.mark.parametrize("maximize", [True, False])
def test_a_nan_value_ranks_where_the_database_sorts_it(
    store: ModelStore, study: Callable[[], str], maximize: bool,
) -> None:
    dialect = store.engine.dialect.name
    nan_first = _NULL_HIGH[dialect] == maximize  # SQLite: NULL; PostgreSQL: above every number
    sign = 1.0 if maximize else -1.0
    name = study()
    for n in range(2):
        _keep(store, name, n, sign * (n + 5), 2, maximize)
    assert _keep(store, name, 2, float("nan"), 2, maximize) == nan_first
    assert not _keep(store, name, 3, sign * 1.0, 2, maximize)
    assert _keep(store, name, 4, sign * 9.0, 2, maximize)
    assert sorted(store.list(name)) == ([2, 4] if nan_first else [1, 4])


@pytest.mark.parametrize("maximize", [True, False])
def test_a_shortlist_takes_a_trial_while_it_is_among_the_keep_best_offered_ties_by_number(maximize: bool) -> None:
    rng = random.Random(7)
    offers = [(rng.choice([0.1, 0.2, 0.3, 0.4, float("nan")]), n) for n in rng.sample(range(100), 40)]
    short = _artifacts.Shortlist(3, maximize)
    seen: list[tuple[float, int]] = []
    for value, number in offers:
        seen.append((value, number))
        # the store's ranking: better value first, then the lower trial number; NaN ranks last
        ranked = sorted(seen, key=lambda p: (p[0] != p[0], -p[0] if maximize else p[0], p[1]))
        want = (value, number) in ranked[:3] or value != value  # NaN: left to the store's write path
        assert short.offer(value, number) == want, (value, number, ranked[:3])
    assert not _artifacts.Shortlist(0, maximize).offer(1.0, 1)
