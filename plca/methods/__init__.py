"""Training methods: each an ``nn.Module`` that owns its segmentor and computes a step (the engine runs the loop).

Importing this package registers the built-in methods; :func:`build_method` builds one by name.
"""

from torch import nn

from plca.methods.base import Method, MethodContext, StepOutput
from plca.methods.registry import get_method, method_names, register_method
from plca.methods import plca, self_training, source_only  # noqa: F401,E402 - registers the built-in methods


def build_method(name: str, segmentor: nn.Module, context: MethodContext) -> Method:
    """The method registered as ``name``, training ``segmentor``."""
    return get_method(name)(segmentor, context)


__all__ = ["Method", "MethodContext", "StepOutput", "build_method", "get_method", "method_names",
           "register_method"]
