"""Methods register by name; the config's ``method`` key and the engine look them up here."""

from __future__ import annotations

from plca.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a :class:`Method` subclass under its ``name``."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]
