"""/v1/studies: launch, monitor, stop, resume, delete and export searches."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import optuna
import torch
from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from fastapi.responses import HTMLResponse, JSONResponse
from optuna.trial import FrozenTrial, TrialState

import studies

from .._errors import finite_json
from .._snapshots import Snapshot, Snapshots
from ..deps import ReadAuth, SettingsDep, SnapshotsDep, StorageDep, WriteAuth
from ..models import (
    ErrorBody,
    FinalizeCreate,
    StudiesPublic,
    StudyProgress,
    StudyPublic,
    StudyUpdate,
    TrialPublic,
    TrialsPublic,
)

_Responses = dict[int | str, dict[str, Any]]
#: every route reads the database: while it is down the answer is a 503 to retry
DB_DOWN: _Responses = {503: {"model": ErrorBody, "description": "The database is unavailable; retry later"}}
log = logging.getLogger("dendro.api")
router = APIRouter(prefix="/v1/studies", tags=["studies"], responses=DB_DOWN)

_E404: _Responses = {404: {"model": ErrorBody, "description": "No study (or trial) of that name"}}
_E409: _Responses = {409: {"model": ErrorBody, "description": "The name exists or the state does not allow it"}}
_E401: _Responses = {401: {"model": ErrorBody, "description": "The API token is missing or wrong"}}
_E413: _Responses = {413: {"model": ErrorBody, "description": "The request body is over the server's limit"}}
_E400: _Responses = {400: {"model": ErrorBody, "description": "The body is not JSON"}}
_NAME_RE = re.compile(studies.NAME_PATTERN)
TRIAL_STATES = studies.TRIAL_STATES
#: a study name in a URL: checked before anything is looked up, so no request reaches the
#: database, a file name or a header with a name that no study could have
Name = Annotated[str, Path(pattern=studies.NAME_PATTERN, min_length=1, max_length=64,
                             description="The study name: letters, digits, '.', '_', '-'; at most 64.")]


def _study_id(storage: optuna.storages.BaseStorage, name: str) -> int:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study named {name!r}") from None


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _snapshot(snapshots: Snapshots, storage: optuna.storages.BaseStorage, name: str) -> Snapshot:
    try:
        return snapshots.get(storage, name)
    except KeyError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study named {name!r}") from None


def _study_public(snap: Snapshot) -> StudyPublic | None:
    """The study as the API shows it, or None for a study dendro did not create.

    One study's rows, read by id and shared by concurrent readers (see ``Snapshots``):
    ``get_all_studies`` read every study of the storage with all its attributes, which made
    one study's page cost as much as the whole list (bench/bench_load.py).
    """
    attrs = snap.user_attrs
    if studies.SPEC_ATTR not in attrs:
        return None
    directions, trials = snap.directions, snap.trials
    spec = attrs[studies.SPEC_ATTR]
    state = studies.state_of(attrs)
    out = StudyPublic(
        name=snap.name,
        study_id=snap.study_id,
        state=state,
        error=attrs.get(studies.ERROR_ATTR) if state == "error" else None,
        n_trials=int(spec.get("n_trials", 0)),
        progress=StudyProgress(**_progress(trials)),
        directions=directions,
        objectives=list(attrs.get("dendro.objectives", [])),
        spec=spec,
        final=studies.final_of(attrs),
    )
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if not done:
        return out
    if len(directions) == 1:
        pick = max if directions[0] == "maximize" else min
        best = pick(done, key=lambda t: t.values[0])
        out.best_value, out.best_trial, out.best_params = _finite(best.values[0]), best.number, best.params
    else:
        out.pareto_trials = sorted(t.number for t in _pareto(done, directions))
    return out


def _pareto(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        av = [s * v for s, v in zip(sign, a.values, strict=True)]
        bv = [s * v for s, v in zip(sign, b.values, strict=True)]
        return all(x >= y for x, y in zip(av, bv, strict=True)) and av != bv

    return [t for t in trials if not any(dominates(o, t) for o in trials)]


def _progress(trials: list[FrozenTrial]) -> dict[str, int]:
    c = dict.fromkeys(TRIAL_STATES, 0)
    for t in trials:
        c[_trial_state(t)] += 1
    c["finished"] = c["complete"] + c["pruned"]
    c["total"] = len(trials)
    return c


def _trial_state(t: FrozenTrial) -> str:
    return studies.trial_state(t)


_METRIC_KEYS = ("val_accuracy", "test_accuracy", "train_accuracy", "val_loss", "test_loss",
                "train_loss", "wall_time", "seconds_per_epoch", "epochs_run", "device", "seed",
                "family", "worker", "reason", "history")


def _trial_public(t: FrozenTrial, with_history: bool) -> TrialPublic:
    keys = _METRIC_KEYS if with_history else _METRIC_KEYS[:-1]
    metrics = {k: t.user_attrs[k] for k in keys if k in t.user_attrs}
    for k, v in list(metrics.items()):
        if isinstance(v, float) and not math.isfinite(v):
            metrics[k] = None
    return TrialPublic(
        number=t.number,
        state=_trial_state(t),
        infeasible=studies.is_infeasible(t),
        values=[_finite(v) for v in t.values] if t.values is not None else None,  # type: ignore[misc]
        params=t.params,
        n_params=t.user_attrs.get("n_params"),
        last_step=max(t.intermediate_values) if t.intermediate_values else None,
        metrics=metrics,
        fail_reason=t.user_attrs.get("fail_reason"),
        datetime_start=t.datetime_start.isoformat() if t.datetime_start else None,
        datetime_complete=t.datetime_complete.isoformat() if t.datetime_complete else None,
    )


def _load(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    _study_id(storage, name)
    return optuna.load_study(study_name=name, storage=storage)


def _limit_error(field: str, message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        detail=[{"loc": ["body", field], "msg": message, "type": "value_error.limit"}],
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=StudyPublic,
    dependencies=[WriteAuth],
    responses={**_E409, **_E401, **_E413},
)
def create_study(spec: studies.StudySpec, storage: StorageDep, settings: SettingsDep,
                 snapshots: SnapshotsDep) -> StudyPublic:
    """Create a study from a spec; workers start pulling its trials at once."""
    if spec.name is None:
        raise _limit_error("name", "a study launched through the API needs a name")
    # The spec's own check lets a trailing newline through (Python's `$`); a name must be
    # whole, because it ends up in file names and headers.
    if not _NAME_RE.fullmatch(spec.name):
        raise _limit_error("name", "a study name is 1-64 characters: letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    if spec.max_params is None:
        raise _limit_error("max_params", "this server trains models of at most "
                           f"{settings.max_params} parameters (its limit max_params): set max_params")
    for field, value, limit in (
        ("n_trials", spec.n_trials, settings.max_trials),
        ("n_epochs", spec.n_epochs, settings.max_epochs),
        ("max_params", spec.max_params, settings.max_params),
    ):
        if value > limit:
            raise _limit_error(field, f"{field}={value} is over this server's limit of {limit}")
    try:
        study = studies.create_study(spec, storage, spec.name)
    except studies.StudyExistsError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    try:
        studies.write_spec_note(study, spec)
    except Exception as exc:  # the study exists: a missing note must not turn it into an error
        log.warning("study %r: the dashboard note was not written: %s", spec.name, exc)
    snapshots.forget(spec.name)
    out = _study_public(_snapshot(snapshots, storage, spec.name))
    assert out is not None
    return out


@router.get("", response_model=StudiesPublic, dependencies=[ReadAuth], responses=_E401)
def list_studies(storage: StorageDep, snapshots: SnapshotsDep) -> StudiesPublic:
    """Every study with its state, progress and best value."""
    data = []
    for s in storage.get_all_studies():
        if studies.SPEC_ATTR not in s.user_attrs:
            continue
        try:
            p = _study_public(snapshots.get(storage, s.study_name))
        except KeyError:
            continue  # deleted since the listing
        if p is not None:
            data.append(p)
    return StudiesPublic(data=data, count=len(data))


@router.get("/{name}", response_model=StudyPublic, dependencies=[ReadAuth], responses={**_E404, **_E401})
def get_study(name: Name, storage: StorageDep, snapshots: SnapshotsDep) -> StudyPublic:
    out = _study_public(_snapshot(snapshots, storage, name))
    if out is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"study {name!r} was not created by dendro")
    return out


@router.get("/{name}/trials", response_model=TrialsPublic, dependencies=[ReadAuth], responses={**_E404, **_E401})
def list_trials(
    name: Name,
    storage: StorageDep,
    settings: SettingsDep,
    snapshots: SnapshotsDep,
    state: Annotated[Literal["complete", "pruned", "failed", "running", "waiting", "infeasible"] | None,
                     Query(description="Only trials in this state.")] = None,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int | None, Query(ge=1, description="Page size (default 50, at most the "
                                       "server's max_page_size).")] = None,
    history: Annotated[bool, Query(description="Include per-epoch history.")] = False,
) -> TrialsPublic:
    """Trials in number order, paged; filter by state."""
    # The default page never exceeds the server's limit, so a plain GET always works.
    limit = limit if limit is not None else min(50, settings.max_page_size)
    if limit > settings.max_page_size:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=[{"loc": ["query", "limit"], "msg": f"limit is at most {settings.max_page_size}",
                     "type": "value_error.limit"}],
        )
    trials = _snapshot(snapshots, storage, name).trials
    if state is not None:
        trials = [t for t in trials if _trial_state(t) == state]
    page = trials[offset : offset + limit]
    return TrialsPublic(data=[_trial_public(t, history) for t in page], count=len(trials),
                        offset=offset, limit=limit)


@router.get("/{name}/best", response_model=list[TrialPublic], dependencies=[ReadAuth], responses={**_E404, **_E401})
def best_trials(name: Name, storage: StorageDep, snapshots: SnapshotsDep) -> list[TrialPublic]:
    """The best trial (one objective) or the Pareto front (two); empty until one completes."""
    snap = _snapshot(snapshots, storage, name)
    trials = [t for t in snap.trials if t.state == TrialState.COMPLETE and t.values is not None]
    if not trials:
        return []
    directions = snap.directions
    if len(directions) == 1:
        pick = max if directions[0] == "maximize" else min
        return [_trial_public(pick(trials, key=lambda t: t.values[0]), True)]
    return [_trial_public(t, False) for t in sorted(_pareto(trials, directions), key=lambda t: t.number)]


def _change_state(name: str, storage: optuna.storages.RDBStorage, snapshots: Snapshots,
                  action: str) -> StudyPublic:
    study = _load(storage, name)
    try:
        # resume also restarts a done study that has trials left (e.g. after a larger n_trials)
        if action == "resume":
            studies.resume_study(study)
        else:
            studies.set_study_state(study, action)
    except studies.StateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    finally:
        snapshots.forget(name)
    return get_study(name, storage, snapshots)


@router.post("/{name}/stop", response_model=StudyPublic, dependencies=[WriteAuth], responses={**_E404, **_E409, **_E401})
def stop_study(name: Name, storage: StorageDep, snapshots: SnapshotsDep) -> StudyPublic:
    """No new trials; running trials stop within one epoch (and are queued again)."""
    return _change_state(name, storage, snapshots, "stop")


@router.post("/{name}/resume", response_model=StudyPublic, dependencies=[WriteAuth], responses={**_E404, **_E409, **_E401})
def resume_study(name: Name, storage: StorageDep, snapshots: SnapshotsDep) -> StudyPublic:
    return _change_state(name, storage, snapshots, "resume")


@contextlib.contextmanager
def _study_change(name: str, snapshots: Snapshots) -> Iterator[None]:
    """A write to a study: the domain's errors as HTTP (404, 422 naming the field, 409), and
    the study's cached read forgotten whatever happens."""
    try:
        yield
    except studies.StudyNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"study {name!r} was not created by dendro") from None
    except studies.SpecError as exc:
        raise _limit_error(exc.field, exc.message) from None
    except studies.StateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    finally:
        snapshots.forget(name)


@router.patch("/{name}", response_model=StudyPublic, dependencies=[WriteAuth],
              responses={**_E404, **_E409, **_E401, **_E413, **_E400})
def update_study(name: Name, body: StudyUpdate, storage: StorageDep, settings: SettingsDep,
                 snapshots: SnapshotsDep) -> StudyPublic:
    """Extend a study: a larger ``n_trials`` (or ``timeout``); a done study runs again."""
    if body.n_trials is not None and body.n_trials > settings.max_trials:
        raise _limit_error("n_trials", f"n_trials={body.n_trials} is over this server's limit of {settings.max_trials}")
    study = _load(storage, name)
    with _study_change(name, snapshots):
        studies.extend_study(study, n_trials=body.n_trials, timeout=body.timeout)
    return get_study(name, storage, snapshots)


@router.post("/{name}/finalize", status_code=status.HTTP_202_ACCEPTED, response_model=dict[str, Any],
             dependencies=[WriteAuth], responses={**_E404, **_E409, **_E401, **_E413, **_E400})
def finalize_study(name: Name, storage: StorageDep, settings: SettingsDep, snapshots: SnapshotsDep,
                   body: FinalizeCreate | None = None) -> dict[str, Any]:
    """Re-train the top ``top_n`` trials (by validation) with ``seeds`` fresh seeds for ``n_epochs``
    epochs; a worker does it. The answer (chosen on validation, test reported) shows under
    ``final`` in ``GET /v1/studies/{name}``."""
    body = body or FinalizeCreate()
    study = _load(storage, name)
    with _study_change(name, snapshots):
        return studies.request_finalize(study, body.top_n, body.seeds, body.n_epochs,
                                        max_epochs=settings.max_epochs)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAuth],
               responses={**_E404, **_E401, **_E409})
def delete_study(name: Name, storage: StorageDep, snapshots: SnapshotsDep) -> Response:
    """Delete the study, its trials and its kept weights."""
    _study_id(storage, name)
    try:
        studies.delete_study(storage, name, timeout=_DELETE_SECONDS)
    except KeyError:
        pass  # deleted meanwhile by another request: gone all the same
    except studies.StorageError as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"study {name!r} could not be deleted within {_DELETE_SECONDS:.0f} s while its "
            f"workers wrote to it ({exc}); stop it, then retry",
        ) from None
    finally:
        snapshots.forget(name)
    studies.ModelStore(storage.engine).delete_study(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


#: how long a delete keeps retrying while the study's workers hold its rows
_DELETE_SECONDS = 10.0


@router.get(
    "/{name}/export",
    dependencies=[ReadAuth],
    responses={**_E404, **_E401, 200: {"content": {"application/json": {}, "text/csv": {}}}},
)
def export_study(
    name: Name, storage: StorageDep, format: Annotated[Literal["json", "csv"], Query()] = "json"
) -> Response:
    """The whole study as JSON (the seed's results shape) or CSV (one row a trial)."""
    study = _load(storage, name)
    # Rendered fully in memory before anything is sent: a failure is an error response,
    # never a truncated file.
    if format == "csv":
        body = studies.study_to_csv(study)
        return Response(body, media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
    # Strict JSON has no NaN: a diverged trial's loss is null.
    return JSONResponse(finite_json(json.loads(json.dumps(studies.study_to_json(study), default=str))))


@router.get(
    "/{name}/plots/{kind}",
    dependencies=[ReadAuth],
    responses={**_E404, **_E401, 200: {"content": {"application/json": {}, "text/html": {}}}},
)
def plot(
    name: Name, kind: str, storage: StorageDep,
    format: Annotated[Literal["json", "html"], Query()] = "json",
) -> Response:
    """A plotly figure of the study: JSON for your own front end, or a standalone HTML page."""
    if kind not in studies.PLOT_KINDS:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            detail=f"unknown plot kind {kind!r}; kinds: {', '.join(studies.PLOT_KINDS)}")
    study = _load(storage, name)
    try:
        fig = studies.make_plot(study, kind)
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    if format == "html":
        return HTMLResponse(fig.to_html(include_plotlyjs=True, full_html=True))
    return Response(fig.to_json(), media_type="application/json")


@router.get(
    "/{name}/trials/{number}/model",
    dependencies=[ReadAuth],
    responses={**_E404, **_E401, 200: {"content": {"application/octet-stream": {}, "application/json": {}}}},
)
def trial_model(
    name: Name, number: Annotated[int, Path(ge=0, le=2**31 - 1, description="The trial number.")],
    storage: StorageDep,
    format: Annotated[Literal["pt", "json"], Query()] = "pt",
) -> Response:
    """The kept weights and config of a trial: a ``torch.load``-able file, or the config as JSON."""
    _study_id(storage, name)
    kept = studies.ModelStore(storage.engine).get(name, number)
    if kept is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"no weights kept for trial {number} of {name!r} (only the best "
            "spec.keep_models completed trials are kept)",
        )
    config, weights = kept
    if format == "json":
        return JSONResponse({"trial": number, "config": config})
    buf = io.BytesIO()
    torch.save({"config": config, "state_dict": torch.load(io.BytesIO(weights), weights_only=True)}, buf)
    return Response(buf.getvalue(), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}-trial{number}.pt"'})
