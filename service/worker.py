"""The worker loop: pull trials from any running study in the storage, train them, report back."""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import optuna

import studies

from ._errors import DB_ERRORS

#: seconds a worker reuses its last read of a study's state (running, stopped, deleted): short
#: enough that a stop lands at the end of the epoch it came in, long enough that a worker of
#: many short epochs (or many members) reads it ten times a second, not once an epoch
STATE_POLL = 0.1

#: a single-trial worker asks as many trials at once as its recent trials of the study take this
#: many seconds to run (at least 1, at most MAX_ASK_AHEAD): trials of seconds or more are asked
#: one at a time, as ever; trials of milliseconds are asked a few at a time, because each ask
#: takes the study's lock and reads what the other workers did, and with many workers the asks,
#: not the trials, were the bound (bench/bench_scale.py)
ASK_AHEAD_SECONDS = 0.25
MAX_ASK_AHEAD = 8
#: seconds a busy worker reuses its listing of the running studies (an idle one lists anew)
LIST_REUSE = 1.0

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger("dendro.worker")


@dataclass
class WorkerConfig:
    storage: str
    device: str = "auto"
    studies: Sequence[str] | None = None
    max_trials: int | None = None
    idle_exit: float | None = None
    poll_interval: float = 1.0
    data_dir: str | None = None
    population: int | str | None = None
    #: "auto" never trains more members at once than this (DENDRO_MAX_POPULATION)
    max_population: int | None = None
    heartbeat_interval: int = 5
    grace_period: int = 20
    #: testing only (DENDRO_FAULT_OOM_TRIALS): trial numbers whose training raises out-of-memory
    oom_trials: frozenset[int] = frozenset()
    #: testing only (DENDRO_FAULT_EPOCH_SECONDS): seconds to wait after each epoch
    epoch_seconds: float = 0.0
    #: a worker that ``dendro serve`` started: stop (as on SIGTERM) once that process is gone
    parent_pid: int | None = None
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class Worker:
    """Loops: choose a runnable study (fairly), ask a trial, train it on the device, tell.

    The worker holds one lease (``studies.Lease``: its row in the workers' table, beaten by
    one thread) and every trial it asks is tied to it. A lost database connection is retried
    with backoff. SIGTERM/SIGINT stop the current trial at its next epoch: it is failed
    visibly ("worker stopped") and its parameters are queued again, so nothing is lost; then
    the worker exits. A SIGKILLed worker's lease goes stale: the next worker that asks fails
    its trials and queues their points again, once. A study whose spec or data this worker
    cannot load is put in state ``error`` with the reason and skipped; the worker goes on.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stop_requested = threading.Event()
        self.trials_done = 0
        self.host = socket.gethostname()
        self._storage: studies.BatchingStorage | None = None
        self._lease: studies.Lease | None = None
        self._dropped = False  # a lost database cut training short: release what it held
        self._studies: dict[str, tuple[Any, optuna.Study, studies.StudySpec]] = {}
        self._served: dict[str, float] = {}
        self._current: tuple[str, int] | None = None
        self._state_unread = False  # the last look at a study's state failed (logged once)
        self._state_seen: tuple[Any, float, str | bool] | None = None  # (which study, when, answer)
        self._listing: tuple[float, list[tuple[str, Any]]] | None = None  # (when, running studies)
        #: trials asked ahead (single-trial mode), run before anything else is asked
        #: (study name, identity, study, spec, trial, the trial's start as asked)
        self._ahead: deque[tuple[str, Any, optuna.Study, studies.StudySpec, optuna.Trial, Any]] = deque()
        self._pace: dict[str, float] = {}  # study -> recent seconds per trial (single-trial mode)

    # -- plumbing ---------------------------------------------------------------------------
    def _connect(self) -> None:
        if self._storage is None:
            self._storage = studies.open_storage(
                self.config.storage,
                heartbeat_interval=self.config.heartbeat_interval,
                grace_period=self.config.grace_period,
                batching=True,
            )
            self._lease = studies.hold_lease(studies.Lease(
                self._storage.engine, lease_id=self.config.worker_id, host=self.host, pid=os.getpid(),
                device=self._device_name(), interval=self.config.heartbeat_interval,
                grace=self.config.grace_period))

    def _device_name(self) -> str:
        import core

        return str(core.resolve_device(self.config.device))

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: stopping after the current epoch", signum)
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _note(self) -> None:
        """What the worker does, written to its lease row with the lease's next beat."""
        if self._lease is not None:
            cur = self._current
            self._lease.update(
                state="training" if cur else "idle",
                study_name=cur[0] if cur else None,
                trial_number=cur[1] if cur else None,
                trials_done=self.trials_done,
            )

    def _watch_parent(self) -> None:
        """A worker that ``dendro serve`` started stops when that process is gone."""
        while not self.stop_requested.wait(1.0):
            if os.getppid() != self.config.parent_pid:
                log.warning("the dendro serve that started this worker (pid %d) is gone: stopping",
                            self.config.parent_pid)
                self.stop_requested.set()
                return

    # -- choosing work ------------------------------------------------------------------------
    def _runnable(self) -> list[tuple[str, Any]]:
        """Running studies as (name, identity), the least recently served first. A busy worker
        reuses its listing for up to LIST_REUSE seconds (each listing reads every study's
        attributes, specs included); an idle one lists anew each time it looks."""
        now = time.monotonic()
        if self._listing is None or now - self._listing[0] >= LIST_REUSE:
            self._listing = (now, self._list_running())
        found = list(self._listing[1])
        # Fair between studies: the one served least recently goes first.
        random.shuffle(found)
        found.sort(key=lambda f: self._served.get(f[0], 0.0))
        return found

    def _list_running(self) -> list[tuple[str, Any]]:
        assert self._storage is not None
        found = []
        for s in self._storage.get_all_studies():
            if self.config.studies and s.study_name not in self.config.studies:
                continue
            attrs = s.user_attrs
            if studies.SPEC_ATTR in attrs and attrs.get(studies.STATE_ATTR) == "running":
                # SQLite reuses the id of a deleted study: each creation has a uid of its own
                # (studies made before it had one: the id and the spec together).
                uid = attrs.get(studies.UID_ATTR)
                found.append((s.study_name, uid if uid else
                              (s._study_id, json.dumps(attrs[studies.SPEC_ATTR], sort_keys=True))))
        # Let go of the studies that are no longer running (done, stopped, deleted): with them
        # go their views and the trials those cached.
        listed = {name for name, _ in found}
        for name in [n for n in self._studies if n not in listed]:
            del self._studies[name]
        return found

    def _study(self, name: str, identity: Any) -> tuple[optuna.Study, studies.StudySpec]:
        cached = self._studies.get(name)
        if cached is None or cached[0] != identity:
            # Each worker seeds its own sampler, or all of them would propose the same points;
            # but a grid sampler's seed orders the grid, and every worker must map a grid id
            # to the same point, so the grid keeps the spec's seed.
            seed = int.from_bytes(os.urandom(4), "little")
            try:
                study, spec = studies.load_study(name, self._storage, sampler_seed=seed)
                if spec.sampler == "grid":
                    study.sampler = studies.make_sampler(spec)
                self._check_data(spec)
            except (studies.StudyNotFoundError, KeyError, *DB_ERRORS):
                raise
            except Exception as exc:  # noqa: BLE001 - a study this worker cannot run
                raise _Unrunnable(_one_line(exc)) from exc
            self._studies[name] = (identity, study, spec)
        return self._studies[name][1:]

    def _let_go(self, name: str) -> None:
        """Forget a study that went away or changed: the next look lists the studies anew and
        loads it again if it is still there."""
        self._studies.pop(name, None)
        self._listing = None

    def _check_data(self, spec: studies.StudySpec) -> None:
        """Load the study's data once (cached for its trials): data that cannot load is the
        study's error, not each trial's."""
        import core

        family = core.get_family(spec.model)
        studies.load_data(spec, self.config.data_dir, flatten=family.input_kind == "flat")

    def _mark_error(self, name: str, identity: Any, reason: str) -> None:
        """Put the study in state error with ``reason`` (if it is still the one that failed)."""
        assert self._storage is not None
        study = optuna.load_study(study_name=name, storage=self._storage)
        with studies.study_lock(self._storage, name):
            attrs = study.user_attrs
            same = not isinstance(identity, str) or attrs.get(studies.UID_ATTR) == identity
            if same and attrs.get(studies.STATE_ATTR) == "running":
                studies.set_study_error(study, reason)
        log.error("study %s cannot run on this worker (%s): it is marked error and skipped", name, reason)

    def _should_stop(self, study: optuna.Study, number: int | None = None) -> str | bool:
        if number is not None and number in self.config.oom_trials:
            import torch

            # Raised inside training, after an epoch: the trial takes the path of a real one.
            raise torch.cuda.OutOfMemoryError(f"injected by DENDRO_FAULT_OOM_TRIALS for trial {number}")
        if self.config.epoch_seconds:
            self.stop_requested.wait(self.config.epoch_seconds)
        if self.stop_requested.is_set():
            return "the worker is shutting down"
        return self._study_stopped(study)

    def _study_stopped(self, study: optuna.Study, identity: Any = None) -> str | bool:
        """Why the study may run no more (stopped, deleted), or False. With the ``identity``
        the listing gave it (its uid), a study deleted and created again under its name is
        deleted too."""
        # The study's state is read from the database at most every STATE_POLL seconds: every
        # epoch of every trial asks, and with many workers those reads were most of a worker's
        # service time (bench/bench_scale.py).
        uid = identity if isinstance(identity, str) else None
        seen, now = self._state_seen, time.monotonic()
        key = (id(study), study._study_id, uid)
        if seen is not None and seen[0] == key and now - seen[1] < STATE_POLL:
            return seen[2]
        answer = self._read_stop(study, uid)
        self._state_seen = (key, now, answer)
        return answer

    def _read_stop(self, study: optuna.Study, uid: str | None = None) -> str | bool:
        try:
            attrs = study._storage.get_study_user_attrs(study._study_id)
            if uid is not None and attrs.get(studies.UID_ATTR) != uid:
                return _DELETED
            state = studies.state_of(attrs)
        except KeyError:
            return _DELETED
        except DB_ERRORS as exc:
            # The database is away: keep training rather than throw the epochs away. The tell
            # waits for it (run() backs off; then the trials it dropped are re-queued).
            if not self._state_unread:
                log.warning("cannot read the state of study %s (%s); training on", study.study_name,
                            exc.__class__.__name__)
            self._state_unread = True
            return False
        self._state_unread = False
        if state != "running":
            return "the study was stopped"
        return False

    def _trial_gone(self, trial_id: int, started: Any) -> bool:
        """Whether the trial was deleted (with its study) since it started."""
        assert self._storage is not None
        try:  # the database's answer: the study's view may still hold the trial
            return self._storage.database.get_trial(trial_id).datetime_start != started
        except KeyError:
            return True

    def run_once(self) -> bool:
        """Run at most one trial; True if one ran."""
        self._connect()
        assert self._storage is not None
        if self._dropped:
            # A lost database cut training short: the trials it held are RUNNING under this
            # worker's lease, which beats on, so no other worker would count them stale.
            studies.release_dropped(self._storage, self.config.worker_id,
                                    "the database went away while it trained; its worker went on")
            self._dropped = False
        if self._ahead:  # asked already: run before anything else is asked
            name, identity, study, spec, trial, started = self._ahead.popleft()
            why = self._study_stopped(study, identity)
            if why == _DELETED:
                self._let_go(name)
                if self._trial_gone(trial._trial_id, started):
                    # its rows went with the study; a study created again under the name (SQLite
                    # reuses ids) may hold a trial with this id: nothing is told
                    log.info("study %s was deleted; dropped trial %d asked ahead", name, trial.number)
                else:  # the study was extended or resumed (a new uid): the trial is still its
                    self._fail_if_running(study, trial, "the study changed before this trial started")
                return True
            if why:  # stopped since the ask: failed unstarted (no point drawn yet)
                self._fail_if_running(study, trial, f"{why} before this trial started")
                return True
            return self._run_trial(name, study, spec, trial)
        for name, identity in self._runnable():
            try:
                try:
                    study, spec = self._study(name, identity)
                except _Unrunnable as exc:
                    self._listing = None
                    self._mark_error(name, identity, str(exc))
                    continue
                if self.config.population and studies.population_supported(spec) is None:
                    if self._run_population(name, study, spec):
                        return True
                    continue
                trials = self._ask(name, study, spec)
            except (studies.StudyNotFoundError, KeyError):
                # Deleted between the listing and the ask (Optuna: "record does not exist").
                log.info("study %s is gone", name)
                self._let_go(name)
                continue
            if not trials:
                continue
            self._ahead.extend((name, identity, study, spec, t, study._storage.get_trial(t._trial_id).datetime_start)
                               for t in trials[1:])
            return self._run_trial(name, study, spec, trials[0])
        return studies.serve_finalize(self._storage, self.config.device, self.config.data_dir,
                                      self.config.worker_id, study_names=list(self.config.studies or []))

    def _ask(self, name: str, study: optuna.Study, spec: studies.StudySpec) -> list[optuna.Trial]:
        """One trial, or as many as the study's recent trials ran in ASK_AHEAD_SECONDS (see
        there; never past ``max_trials``): they are tied to this worker's lease at once."""
        pace = self._pace.get(name)
        n = 1 if pace is None else max(1, min(MAX_ASK_AHEAD, int(ASK_AHEAD_SECONDS / max(pace, 1e-6))))
        if n > 1 and not studies.draws_at_start(study):
            n = 1  # its sampler gives a trial its point at the ask (a grid id): never ask ahead
        if self.config.max_trials is not None:
            n = max(1, min(n, self.config.max_trials - self.trials_done))
        return studies.ask_trials(study, spec, n)

    def _release_ahead(self, reason: str) -> None:
        """Fail the trials asked ahead and never started (no point was drawn for them: the
        study asks fresh ones in their place)."""
        while self._ahead:
            _, identity, study, _, trial, started = self._ahead.popleft()
            try:
                if self._study_stopped(study, identity) != _DELETED or not self._trial_gone(trial._trial_id, started):
                    self._fail_if_running(study, trial, reason)
            except DB_ERRORS as exc:  # the database is away: the lease goes stale and the reaper fails them
                log.warning("could not release trial %d asked ahead: %s", trial.number, exc.__class__.__name__)

    def _run_trial(self, name: str, study: optuna.Study, spec: studies.StudySpec, trial: optuna.Trial) -> bool:
        """Train one asked trial and tell it; True (it ran, or its study went away meanwhile)."""
        assert self._storage is not None
        # The trial is tied to this worker's lease, which its one thread keeps beating.
        # (Its start as the study's storage holds it: this worker's view, no read.)
        try:
            started = study._storage.get_trial(trial._trial_id).datetime_start
        except KeyError:  # asked ahead, and its study was deleted since
            self._studies.pop(name, None)
            return True
        self._served[name] = time.time()
        self._current = (name, trial.number)
        self._note()
        t0 = time.monotonic()
        try:
            out = studies.execute_trial(
                study, trial, spec, device=self.config.device, data_dir=self.config.data_dir,
                model_store=studies.ModelStore(self._storage.engine),
                should_stop=functools.partial(self._should_stop, study, trial.number),
                worker=f"{self.host}:{os.getpid()}",
            )
        except KeyError:
            # Optuna's "record does not exist": the study, and so this trial, was deleted
            # while it trained; there is nothing left to tell. Or the study is there but was
            # made anew under its name, or extended or resumed (each gives it a new uid, so
            # that workers read its spec again): this worker's view of it is no longer the
            # study's, and the trial, if it is still running, is failed with the reason.
            self._let_go(name)
            if self._trial_gone(trial._trial_id, started):
                log.info("study %s was deleted while trial %d ran; dropped it", name, trial.number)
            else:
                log.warning("study %s changed while trial %d ran (made anew, extended or resumed); "
                            "the worker reads it again", name, trial.number)
                self._fail_if_running(study, trial, "the study changed while this trial ran")
            return True
        except DB_ERRORS:
            raise  # run() backs off and retries; the trial's heartbeat lapses and it is retried
        except Exception as exc:  # noqa: BLE001 - one trial's error must not stop the worker
            log.exception("study %s trial %d raised; the worker goes on", name, trial.number)
            self._fail_if_running(study, trial, f"{exc.__class__.__name__}: {exc}")
            return True
        finally:
            self._current = None
            self._note()
        seconds = time.monotonic() - t0
        pace = self._pace.get(name)
        self._pace[name] = seconds if pace is None else 0.7 * pace + 0.3 * seconds
        if out.state not in ("infeasible", "lost"):
            self.trials_done += 1
        log.info("study %s trial %d: %s %s", name, out.number, out.state,
                 out.values if out.values else (out.reason or ""))
        return True

    def _population_size(self) -> int | str:
        p = str(self.config.population).strip().lower()
        return "auto" if p == "auto" else int(p)

    def _run_population(self, name: str, study: optuna.Study, spec: studies.StudySpec) -> bool:
        """Train this study's trials K at a time until it has none left; True if any ran."""
        assert self._storage is not None
        left = None
        if self.config.max_trials is not None:
            left = max(0, self.config.max_trials - self.trials_done)
        self._served[name] = time.time()
        self._current = (name, -1)
        self._note()
        try:
            outs = studies.execute_population(
                study, spec, population_size=self._population_size(), device=self.config.device,
                max_population=self.config.max_population,
                data_dir=self.config.data_dir, model_store=studies.ModelStore(self._storage.engine),
                should_stop=functools.partial(self._should_stop, study),
                worker=f"{self.host}:{os.getpid()}", max_trials=left,
            )
        except DB_ERRORS:
            raise  # run() backs off; if it stays away, the lease lapses and the trials are retried
        except (studies.StudyNotFoundError, KeyError):
            # Optuna's "record does not exist": the study was deleted while its population
            # trained; there is nothing left to tell.
            self._studies.pop(name, None)
            log.info("study %s was deleted while its population trained; dropped it", name)
            return True
        except Exception:  # noqa: BLE001 - one population's error must not stop the worker
            log.exception("study %s: a population raised; the worker goes on", name)
            self.stop_requested.wait(self.config.poll_interval)
            return True
        finally:
            self._current = None
            self._note()
        trained = [o for o in outs if o.state not in ("infeasible", "lost")]
        self.trials_done += len(trained)
        if outs:
            states: dict[str, int] = {}
            for o in outs:
                states[o.state] = states.get(o.state, 0) + 1
            log.info("study %s: population of up to %s ran %d trials %s", name,
                     self.config.population, len(outs), states)
        return bool(outs)

    @staticmethod
    def _fail_if_running(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
        try:
            if study._storage.get_trial(trial._trial_id).state == optuna.trial.TrialState.RUNNING:
                trial.set_user_attr("fail_reason", reason)
                trial.set_user_attr(studies.TRIAL_STATE_ATTR, "failed")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except Exception as exc:  # noqa: BLE001 - if it stays RUNNING, the next worker re-queues it
            log.warning("could not fail trial %d: %s", trial.number, exc)

    def run(self) -> int:
        """The loop; returns an exit code."""
        if self.config.parent_pid:
            threading.Thread(target=self._watch_parent, name="watch-parent", daemon=True).start()
        backoff = 1.0
        idle_since = time.monotonic()
        try:
            while not self.stop_requested.is_set():
                if self.config.max_trials is not None and self.trials_done >= self.config.max_trials:
                    break
                try:
                    ran = self.run_once()
                    backoff = 1.0
                except DB_ERRORS as exc:
                    log.warning("database unavailable (%s); retrying in %.0fs",
                                exc.__class__.__name__, backoff)
                    self._studies.clear()
                    if self._storage is not None:
                        self._storage.forget()  # the views' held-back writes are of dropped trials
                    self._ahead.clear()  # RUNNING under this lease: released with the dropped ones
                    self._listing = None
                    self._dropped = True
                    self.stop_requested.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                if ran:
                    idle_since = time.monotonic()
                    continue
                self._listing = None  # idle: the next look lists the studies anew
                if self.config.idle_exit is not None and time.monotonic() - idle_since >= self.config.idle_exit:
                    log.info("idle for %.0fs: exiting", self.config.idle_exit)
                    break
                self.stop_requested.wait(self.config.poll_interval)
        finally:
            self.stop_requested.set()
            self._release_ahead("the worker stopped before this trial started")
            if self._lease is not None:
                self._lease.close(remove=True)  # best effort: a lease left behind goes stale
        return 0


#: the stop reason of a study that was deleted
_DELETED = "the study was deleted"


class _Unrunnable(Exception):
    """A study whose spec or data this worker cannot load."""


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = "; ".join(x.strip() for x in lines[:3]) if lines else ""
    return f"{exc.__class__.__name__}: {text}"[:500]
