"""Plain data (dicts, lists, scalars) -> typed dataclasses, read by the dataclasses' own type hints.

:mod:`plca.config` builds its config with OmegaConf (part of the ``[train]`` extra). On the core install
(torch, numpy, safetensors) this reader builds the same dataclasses from a config stored in a model file
(``plca.load_model``), so the dataclasses stay the one schema. It reads the types the config schemas use:
``bool``, ``int``, ``float`` (an integer is widened, as OmegaConf does), ``str``, ``Any``, ``list[X]``,
``X | None`` and nested dataclasses; a missing key takes the field's default. Unlike OmegaConf it converts
nothing else (no ``"3"`` -> ``3``): a stored config was written typed. Errors name the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any


class DataclassReadError(ValueError):
    """A value does not fit the schema; the message names the dotted key and the problem."""


def describe_type(tp: Any) -> str:
    """``int | None`` -> ``'an integer or null'``: a type hint in a config's words."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [describe_type(t) for t in typing.get_args(tp) if t is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return f"a list of {describe_type(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def read_dataclass(schema: type, data: Any, prefix: str = "") -> Any:
    """An instance of the dataclass ``schema`` from the mapping ``data`` (keys absent: the defaults).

    ``prefix``: the dotted key of ``data`` in error messages (``"plca."``; ``""`` at the top level).
    Raises :class:`DataclassReadError` for an unknown key or a value of the wrong type.
    """
    where = f"'{prefix[:-1]}'" if prefix else "the top level"
    if not isinstance(data, dict):
        raise DataclassReadError(f"{'config key ' + where if prefix else 'the config'} must be a mapping, got {data!r}")
    fields = {field.name: field for field in dataclasses.fields(schema) if field.init}
    hints = typing.get_type_hints(schema)
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise DataclassReadError(f"unknown config key '{prefix}{unknown[0]}'; keys allowed at {where}: "
                                 f"{', '.join(fields)}")
    return schema(**{key: _read_value(hints[key], value, f"{prefix}{key}") for key, value in data.items()})


def _read_value(tp: Any, value: Any, key: str) -> Any:
    """``value`` as the type hint ``tp`` asks (see the module's docstring), or a named error."""
    if tp is Any:
        return copy.deepcopy(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(tp) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:
            return _read_value(options[0], value, key)
    elif origin is list and isinstance(value, (list, tuple)):
        return [_read_value(typing.get_args(tp)[0], item, f"{key}.{index}") for index, item in enumerate(value)]
    elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return read_dataclass(tp, value, key + ".")
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if tp is float or isinstance(value, int):
            return tp(value)
    elif tp is str and isinstance(value, str):
        return value
    raise DataclassReadError(f"config key '{key}' must be {describe_type(tp)}, got {value!r}")
