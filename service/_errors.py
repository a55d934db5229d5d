"""Validation errors as users read them: the field at fault and what is allowed (REST and CLI)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna
import sqlalchemy as sa

import studies

#: errors that mean "the database did not answer": the API answers 503, a worker backs off
DB_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DBAPIError, studies.StorageError,
    optuna.exceptions.StorageInternalError,
)
__all__ = ["spec_error_items", "finite_json", "db_unreachable", "DB_ERRORS"]

_PYDANTIC_PREFIX = "Value error, "


def spec_error_items(errors: Iterable[Mapping[str, Any]], root: Sequence[str | int] = ()) -> list[dict[str, Any]]:
    """Pydantic's errors of a ``StudySpec`` as ``{"loc", "msg", "type"}`` that name the field.

    The spec's cross-field checks raise ``studies.SpecError`` from a model validator, which
    pydantic reports at the model's root; the error carries the dotted field, so put it back
    into ``loc``. An unknown key lists the keys a spec takes. ``root`` is where the spec sits
    in ``loc`` (``("body",)`` for a request body).
    """
    out = []
    for e in errors:
        loc = list(e.get("loc", ()))
        msg = str(e.get("msg", ""))
        kind = str(e.get("type", "value_error"))
        err = (e.get("ctx") or {}).get("error")
        if isinstance(err, studies.SpecError):
            loc = [*loc, *err.field.split(".")]
            msg = err.message
        elif kind == "extra_forbidden" and len(loc) == len(root) + 1 and loc[: len(root)] == list(root):
            msg = f"unknown key {loc[-1]!r}; a study spec takes: {', '.join(studies.StudySpec.model_fields)}"
        elif msg.startswith(_PYDANTIC_PREFIX):
            msg = msg[len(_PYDANTIC_PREFIX):]
        out.append({"loc": loc, "msg": msg, "type": kind})
    return out


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None: strict JSON has neither."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def db_unreachable(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is a lost or refused database connection.

    Optuna reports those as ``StorageInternalError`` ("exceeding max length"...), with the
    driver's error as its cause.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.DisconnectionError):
            return True
        if isinstance(cur, sa.exc.DBAPIError) and cur.connection_invalidated:
            return True
        cur = cur.__cause__ or cur.__context__
    return False
