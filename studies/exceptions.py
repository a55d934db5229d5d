"""The exceptions of ``studies``: one hierarchy; messages name the field and what is allowed."""

from __future__ import annotations

__all__ = [
    "StudiesError",
    "SpecError",
    "BudgetError",
    "StudyNotFoundError",
    "StudyExistsError",
    "StateError",
    "StorageError",
]


class StudiesError(Exception):
    """Base class of every error raised by ``studies``."""


class SpecError(StudiesError, ValueError):
    """A study spec that cannot run. ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class BudgetError(SpecError):
    """No point of the search space fits under ``max_params``."""

    def __init__(self, message: str, min_params: int, min_point: dict[str, object]) -> None:
        super().__init__("max_params", message)
        self.min_params = min_params
        self.min_point = min_point


class StudyNotFoundError(StudiesError, KeyError):
    """No study of that name in the storage."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "study not found"


class StudyExistsError(StudiesError):
    """A study of that name exists already."""


class StateError(StudiesError):
    """A state change that is not allowed (e.g. resuming a study that is done)."""


class StorageError(StudiesError):
    """A storage URL that cannot be used, or a database that cannot be reached."""
