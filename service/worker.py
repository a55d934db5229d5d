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
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import optuna

import studies

from ._errors import DB_ERRORS
from ._workers_table import WorkerRegistry

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
    #: a worker that ``dendro serve`` started: stop (as on SIGTERM) once that process is gone
    parent_pid: int | None = None
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class Worker:
    """Loops: choose a runnable study (fairly), ask a trial, train it on the device, tell.

    A lost database connection is retried with backoff. SIGTERM/SIGINT stop the current
    trial at its next epoch: it is failed visibly ("worker stopped") and its parameters are
    queued again, so nothing is lost; then the worker exits. A SIGKILLed worker's trial
    stops beating and is re-queued by the next worker that asks (Optuna heartbeats).
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stop_requested = threading.Event()
        self.trials_done = 0
        self.host = socket.gethostname()
        self._storage: optuna.storages.RDBStorage | None = None
        self._registry: WorkerRegistry | None = None
        self._studies: dict[str, tuple[Any, optuna.Study, studies.StudySpec]] = {}
        self._served: dict[str, float] = {}
        self._current: tuple[str, int] | None = None
        self._state_unread = False  # the last look at a study's state failed (logged once)

    # -- plumbing ---------------------------------------------------------------------------
    def _connect(self) -> None:
        if self._storage is None:
            self._storage = studies.open_storage(
                self.config.storage,
                heartbeat_interval=self.config.heartbeat_interval,
                grace_period=self.config.grace_period,
            )
            self._registry = WorkerRegistry(self._storage.engine)
            self._registry.register(self.config.worker_id, self.host, os.getpid(), self._device_name())

    def _device_name(self) -> str:
        import core

        return str(core.resolve_device(self.config.device))

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: stopping after the current epoch", signum)
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _beat_now(self) -> None:
        try:
            if self._registry is not None:
                cur = self._current
                self._registry.beat(
                    self.config.worker_id,
                    state="training" if cur else "idle",
                    study_name=cur[0] if cur else None,
                    trial_number=cur[1] if cur else None,
                    trials_done=self.trials_done,
                )
        except Exception as exc:  # noqa: BLE001 - the next beat retries
            log.debug("worker beat failed: %s", exc)

    def _beat_loop(self) -> None:
        last = time.monotonic()
        # a worker that watches its parent looks every second; the others wake only to beat
        while not self.stop_requested.wait(1.0 if self.config.parent_pid else 5.0):
            if self.config.parent_pid and os.getppid() != self.config.parent_pid:
                log.warning("the dendro serve that started this worker (pid %d) is gone: stopping",
                            self.config.parent_pid)
                self.stop_requested.set()
                return
            if time.monotonic() - last >= 5.0:
                last = time.monotonic()
                self._beat_now()

    # -- choosing work ------------------------------------------------------------------------
    def _runnable(self) -> list[tuple[str, Any]]:
        """Running studies as (name, identity), the least recently served first."""
        assert self._storage is not None
        found = []
        for s in self._storage.get_all_studies():
            if self.config.studies and s.study_name not in self.config.studies:
                continue
            attrs = s.user_attrs
            if studies.SPEC_ATTR in attrs and attrs.get(studies.STATE_ATTR) == "running":
                # SQLite reuses the id of a deleted study: with the spec, the pair tells a
                # study created again under its old name from the one this worker knew.
                found.append((s.study_name, (s._study_id, json.dumps(attrs[studies.SPEC_ATTR], sort_keys=True))))
        # Fair between studies: the one served least recently goes first.
        random.shuffle(found)
        found.sort(key=lambda f: self._served.get(f[0], 0.0))
        return found

    def _study(self, name: str, identity: Any) -> tuple[optuna.Study, studies.StudySpec]:
        cached = self._studies.get(name)
        if cached is None or cached[0] != identity:
            # Each worker seeds its own sampler, or all of them would propose the same points;
            # but a grid sampler's seed orders the grid, and every worker must map a grid id
            # to the same point, so the grid keeps the spec's seed.
            seed = int.from_bytes(os.urandom(4), "little")
            study, spec = studies.load_study(name, self._storage, sampler_seed=seed)
            if spec.sampler == "grid":
                study.sampler = studies.make_sampler(spec)
            self._studies[name] = (identity, study, spec)
        return self._studies[name][1:]

    def _should_stop(self, study: optuna.Study, number: int | None = None) -> str | bool:
        if number is not None and number in self.config.oom_trials:
            import torch

            # Raised inside training, after an epoch: the trial takes the path of a real one.
            raise torch.cuda.OutOfMemoryError(f"injected by DENDRO_FAULT_OOM_TRIALS for trial {number}")
        if self.stop_requested.is_set():
            return "the worker is shutting down"
        try:
            state = studies.study_state(study)
        except KeyError:
            return "the study was deleted"
        except DB_ERRORS as exc:
            # The database is away: keep training rather than throw the epochs away. The tell
            # waits for it (run() backs off), or the trial's lapsed heartbeat re-queues it.
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
        try:
            return self._storage.get_trial(trial_id).datetime_start != started
        except KeyError:
            return True

    def run_once(self) -> bool:
        """Run at most one trial; True if one ran."""
        self._connect()
        assert self._storage is not None
        for name, identity in self._runnable():
            try:
                study, spec = self._study(name, identity)
                if self.config.population and studies.population_supported(spec) is None:
                    if self._run_population(name, study, spec):
                        return True
                    continue
                trial = studies.ask_trial(study, spec)
            except (studies.StudyNotFoundError, KeyError):
                # Deleted between the listing and the ask (Optuna: "record does not exist").
                log.info("study %s is gone", name)
                self._studies.pop(name, None)
                continue
            if trial is None:
                continue
            # Beat for the trial from now on: Optuna never counts a RUNNING trial without any
            # beat as stale, and execute_trial only starts beating once the data is loaded,
            # so a worker killed while loading would leave its trial RUNNING forever.
            if self._storage.get_heartbeat_interval():
                self._storage.record_heartbeat(trial._trial_id)
            started = self._storage.get_trial(trial._trial_id).datetime_start
            self._served[name] = time.time()
            self._current = (name, trial.number)
            self._beat_now()
            try:
                with studies.heartbeat(self._storage, trial._trial_id):
                    out = studies.execute_trial(
                        study, trial, spec, device=self.config.device, data_dir=self.config.data_dir,
                        model_store=studies.ModelStore(self._storage.engine),
                        should_stop=functools.partial(self._should_stop, study, trial.number),
                        worker=f"{self.host}:{os.getpid()}",
                    )
            except KeyError:
                # Optuna's "record does not exist": the study, and so this trial, was deleted
                # while it trained; there is nothing left to tell.
                self._studies.pop(name, None)
                if not self._trial_gone(trial._trial_id, started):
                    raise
                log.info("study %s was deleted while trial %d ran; dropped it", name, trial.number)
                return True
            except DB_ERRORS:
                raise  # run() backs off and retries; the trial's heartbeat lapses and it is retried
            except Exception as exc:  # noqa: BLE001 - one trial's error must not stop the worker
                log.exception("study %s trial %d raised; the worker goes on", name, trial.number)
                self._fail_if_running(study, trial, f"{exc.__class__.__name__}: {exc}")
                return True
            finally:
                self._current = None
            if out.state not in ("infeasible",):
                self.trials_done += 1
            log.info("study %s trial %d: %s %s", name, out.number, out.state,
                     out.values if out.values else (out.reason or ""))
            return True
        return False

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
        self._beat_now()
        try:
            outs = studies.execute_population(
                study, spec, population_size=self._population_size(), device=self.config.device,
                max_population=self.config.max_population,
                data_dir=self.config.data_dir, model_store=studies.ModelStore(self._storage.engine),
                should_stop=functools.partial(self._should_stop, study),
                worker=f"{self.host}:{os.getpid()}", max_trials=left,
            )
        except DB_ERRORS:
            raise  # run() backs off; the members' heartbeats lapse and they are retried
        except Exception:  # noqa: BLE001 - one population's error must not stop the worker
            log.exception("study %s: a population raised; the worker goes on", name)
            self.stop_requested.wait(self.config.poll_interval)
            return True
        finally:
            self._current = None
        trained = [o for o in outs if o.state != "infeasible"]
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
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except Exception as exc:  # noqa: BLE001 - its heartbeat lapses and it is retried
            log.warning("could not fail trial %d: %s", trial.number, exc)

    def run(self) -> int:
        """The loop; returns an exit code."""
        beat = threading.Thread(target=self._beat_loop, name="worker-beat", daemon=True)
        beat.start()
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
                    self.stop_requested.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                if ran:
                    idle_since = time.monotonic()
                    continue
                if self.config.idle_exit is not None and time.monotonic() - idle_since >= self.config.idle_exit:
                    log.info("idle for %.0fs: exiting", self.config.idle_exit)
                    break
                self.stop_requested.wait(self.config.poll_interval)
        finally:
            self.stop_requested.set()
            try:
                if self._registry is not None:
                    self._registry.remove(self.config.worker_id)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        return 0
