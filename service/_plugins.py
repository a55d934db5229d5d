"""Plugins: user modules that register model families and datasets, imported before any spec is read."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable

__all__ = ["ENTRY_POINT_GROUP", "PluginError", "load_plugins"]

log = logging.getLogger("dendro.plugins")

#: installed packages name their plugin modules in this entry-point group (pyproject:
#: ``[project.entry-points."dendro.plugins"] mine = "my_package.dendro_plugin"``)
ENTRY_POINT_GROUP = "dendro.plugins"


class PluginError(Exception):
    """A plugin could not be imported; the message names it and the reason, on one line."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}".rstrip(": ")


def load_plugins(names: Iterable[str], *, entry_points: bool = True) -> list[str]:
    """Import each module of ``names``, then every ``dendro.plugins`` entry point.

    Returns what was loaded, in order and once each. The API and every worker call this
    before reading a spec, so a family or dataset that a plugin registers is known to all of
    them. Importing a module twice is a no-op (``sys.modules``), so a name given both by
    ``--plugin`` and by ``DENDRO_PLUGINS`` is loaded once.
    """
    loaded: list[str] = []
    for name in dict.fromkeys(n.strip() for n in names if n and n.strip()):
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything on import
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise PluginError(f"plugin {name!r} failed to import: {_one_line(exc)}") from exc
        loaded.append(name)
    if entry_points:
        from importlib.metadata import entry_points as _entry_points

        for ep in _entry_points(group=ENTRY_POINT_GROUP):
            if ep.value in loaded:
                continue
            try:
                ep.load()
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise PluginError(f"plugin {ep.name!r} (entry point {ep.value!r} of group "
                                  f"{ENTRY_POINT_GROUP!r}) failed to import: {_one_line(exc)}") from exc
            loaded.append(ep.value)
    if loaded:
        log.info("plugins loaded: %s", ", ".join(loaded))
    return loaded
