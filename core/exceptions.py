"""The exceptions of ``core``: one hierarchy, each message says what is allowed."""

from __future__ import annotations

__all__ = [
    "CoreError",
    "UnknownNameError",
    "DuplicateNameError",
    "DatasetNotFoundError",
    "TrainingDivergedError",
]


class CoreError(Exception):
    """Base class of every error raised by ``core``."""


class UnknownNameError(CoreError, ValueError):
    """A model family, dataset or other registry name that is not registered."""


class DuplicateNameError(CoreError, ValueError):
    """A second registration under a name that is already taken."""


class DatasetNotFoundError(CoreError, FileNotFoundError):
    """A dataset whose files are nowhere we looked; the message says where and how to get it."""


class TrainingDivergedError(CoreError, FloatingPointError):
    """The training loss became NaN or infinite."""
