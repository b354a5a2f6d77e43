"""Plugins: a user's own backbones, heads, methods and dataset formats, registered before a command runs.

A plugin is an importable module whose import registers things (``register_backbone``,
``register_head``, ``register_method``, ``register_format``). Two places name plugins:

- the environment variable ``PLCA_PLUGINS``: module names separated by commas
  (``PLCA_PLUGINS=my_nets,my_data``), found on ``sys.path`` / ``PYTHONPATH``. Child processes
  inherit it, so torchrun's workers and a sweep's runs see the same registrations;
- the entry points of the group ``plca.plugins`` of installed distributions (in the user's
  ``pyproject.toml``: ``[project.entry-points."plca.plugins"]`` ``my_nets = "my_pkg.nets"``). An
  entry point naming a module is imported; one naming a function (``"my_pkg.nets:register"``) is
  also called, without arguments.

:func:`load_plugins` imports them once per process; the ``plca`` command and ``plca.load_model``
call it first. A plugin that fails raises :class:`PluginError`: one line naming the plugin, where
it was named and the error. This module imports nothing of plca, so it sits below every layer.
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Iterable
from typing import Any

#: The environment variable that names plugin modules, comma-separated.
ENV_VAR = "PLCA_PLUGINS"
#: The entry point group of installed plugins.
ENTRY_POINT_GROUP = "plca.plugins"

_LOADED: tuple[str, ...] | None = None  # what load_plugins imported in this process, once it has run
_FAILURE: PluginError | None = None  # the error of a load_plugins that failed in this process


class PluginError(Exception):
    """A plugin failed to import: the message names the plugin, where it was named and the error."""


def plugin_modules(value: str | None) -> list[str]:
    """The module names of a ``PLCA_PLUGINS`` value: comma-separated, blanks ignored, repeats once."""
    names = [name.strip() for name in (value or "").split(",")]
    return list(dict.fromkeys(name for name in names if name))


#: What a plugin may raise that stops the command as :class:`PluginError`: ``SystemExit`` too, since a
#: module that calls ``sys.exit`` on import would otherwise end the command, status 0 included, unexplained.
_PLUGIN_FAILURES = (Exception, SystemExit)


def _one_line(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _import_named(name: str) -> None:
    try:
        importlib.import_module(name)
    except _PLUGIN_FAILURES as error:  # any failure of a user's module is reported as one line
        raise PluginError(f"plugin '{name}' (named in ${ENV_VAR}) failed to import: {_one_line(error)}") from None


def _origin(entry: Any) -> str:
    dist = getattr(entry, "dist", None)
    where = f"the distribution '{dist.name}' {dist.version}" if dist is not None else "an installed distribution"
    return f"entry point '{entry.name} = {entry.value}' of {where}, group {ENTRY_POINT_GROUP}"


def _load_entry(entry: Any) -> None:
    try:
        loaded = entry.load()
        if isinstance(loaded, types.FunctionType):
            loaded()
    except _PLUGIN_FAILURES as error:  # any failure of a user's module is reported as one line
        raise PluginError(f"plugin {_origin(entry)} failed to load: {_one_line(error)}") from None


def installed_entry_points() -> list[Any]:
    """The entry points of the group ``plca.plugins`` of the installed distributions."""
    from importlib.metadata import entry_points  # torch imports importlib.metadata already: no extra cost

    return list(entry_points(group=ENTRY_POINT_GROUP))


def import_plugins(modules: Iterable[str], entries: Iterable[Any]) -> tuple[str, ...]:
    """Import ``modules`` (names), then load ``entries`` (``importlib.metadata.EntryPoint``), in order.

    Returns what was loaded (module names, then ``entry point name = value``); raises
    :class:`PluginError` at the first plugin that fails.
    """
    loaded = []
    for name in modules:
        _import_named(name)
        loaded.append(name)
    for entry in entries:
        _load_entry(entry)
        loaded.append(f"{entry.name} = {entry.value}")
    return tuple(loaded)


def loaded_plugins() -> tuple[str, ...]:
    """What :func:`load_plugins` imported in this process (empty if it has not run): a run records it."""
    return _LOADED or ()


def load_plugins() -> tuple[str, ...]:
    """Import the plugins of ``$PLCA_PLUGINS`` and of the ``plca.plugins`` entry points, once per process.

    Returns what was loaded; a later call returns the same without importing again. After a
    :class:`PluginError` a later call raises the same error: importing again would run the
    registrations the failed plugin made before failing a second time ("registered twice"), hiding
    the real error; a fixed plugin needs a new process.
    """
    global _LOADED, _FAILURE
    if _FAILURE is not None:
        raise _FAILURE
    if _LOADED is None:
        try:
            _LOADED = import_plugins(plugin_modules(os.environ.get(ENV_VAR)), installed_entry_points())
        except PluginError as error:
            _FAILURE = error
            raise
    return _LOADED
