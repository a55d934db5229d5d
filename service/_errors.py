"""Validation errors as users read them: the field at fault and what is allowed (REST and CLI)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import studies

__all__ = ["spec_error_items", "finite_json"]

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
