"""More trials (or time) for an existing study, and resuming one that is done with trials left."""

from __future__ import annotations

import time
import uuid
from typing import Any

import optuna

from ._runner import (
    ERROR_ATTR,
    SPEC_ATTR,
    STARTED_ATTR,
    STATE_ATTR,
    UID_ATTR,
    progress,
    set_study_state,
    study_spec,
    study_state,
)
from ._spec import StudySpec
from ._storage import study_lock
from .exceptions import SpecError, StateError

__all__ = ["extend_study", "resume_study"]

def _elapsed(attrs: dict[str, Any]) -> float | None:
    started = attrs.get(STARTED_ATTR)
    return None if started is None else time.time() - float(started)


def _runnable_again(spec: StudySpec, finished: int, attrs: dict[str, Any]) -> bool:
    elapsed = _elapsed(attrs)
    return finished < spec.n_trials and (spec.timeout is None or elapsed is None or elapsed < spec.timeout)


def extend_study(study: optuna.Study, *, n_trials: int | None = None, timeout: float | None = None) -> str:
    """Give ``study`` a new total ``n_trials`` and/or ``timeout``; return its state afterwards.

    A study that is done runs again (workers pick it up at once); a stopped or queued one
    keeps its state; a running one simply goes on longer. ``n_trials`` must be more than
    the trials already finished, and a ``timeout`` must not have passed already (a
    SpecError naming the field). A study in state ``error`` cannot be extended (StateError):
    its spec does not run.
    """
    if n_trials is None and timeout is None:
        raise SpecError("n_trials", "give a new n_trials (more than the finished trials) or a new timeout")
    with study_lock(study._storage, study.study_name):
        attrs = study.user_attrs
        state = study_state(study)
        if state == "error":
            reason = attrs.get(ERROR_ATTR, "its spec cannot run")
            raise StateError(f"cannot extend study {study.study_name!r}: it is in state error ({reason}); "
                             "create a new study with a spec that runs")
        try:
            spec = study_spec(study)
        except ValueError as exc:  # pydantic's ValidationError: e.g. a plugin's family not loaded here
            raise StateError(f"cannot extend study {study.study_name!r}: its stored spec does not load "
                             f"here ({str(exc).splitlines()[0]}...)") from None
        finished = int(progress(study)["finished"])
        if n_trials is not None and n_trials <= finished:
            raise SpecError("n_trials", f"study {study.study_name!r} has {finished} finished trials: "
                            f"n_trials={n_trials} must be more than that to extend it")
        update: dict[str, Any] = {}
        if n_trials is not None:
            update["n_trials"] = n_trials
        if timeout is not None:
            update["timeout"] = timeout
        new = StudySpec.model_validate({**spec.model_dump(), **update})
        elapsed = _elapsed(attrs)
        if new.timeout is not None and elapsed is not None and elapsed >= new.timeout:
            raise SpecError("timeout", f"study {study.study_name!r} started {elapsed:.0f} s ago, past its "
                            f"timeout of {new.timeout:g} s: give a larger timeout to run more trials")
        study.set_user_attr(SPEC_ATTR, new.public_dict())
        if UID_ATTR in attrs:
            # Workers cache a study by its uid: a new one makes them read the new spec (a
            # worker holding the old n_trials would otherwise call the study done again).
            study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
        if state == "done" and _runnable_again(new, finished, attrs):
            study.set_user_attr(STATE_ATTR, "running")
            return "running"
        return state


def resume_study(study: optuna.Study) -> str:
    """Resume a stopped or queued study, or a done one that has trials (and time) left."""
    with study_lock(study._storage, study.study_name):
        if study_state(study) == "done":
            spec = study_spec(study)
            finished = int(progress(study)["finished"])
            if not _runnable_again(spec, finished, study.user_attrs):
                raise StateError(f"cannot resume study {study.study_name!r}: it is done ({finished} of "
                                 f"{spec.n_trials} trials finished); extend it with a larger n_trials")
            if UID_ATTR in study.user_attrs:
                study.set_user_attr(UID_ATTR, uuid.uuid4().hex)  # workers re-read its spec
            study.set_user_attr(STATE_ATTR, "running")
            return "running"
        return set_study_state(study, "resume")
