"""Training methods: what one step computes (the engine runs the loop)."""

from plca.config import LossConfig
from plca.methods.base import Method, StepOutput
from plca.methods.plca import PLCA
from plca.methods.source_only import SourceOnly

METHODS: dict[str, type[Method]] = {"source_only": SourceOnly, "plca": PLCA}


def build_method(name: str, loss: LossConfig) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name](loss)


__all__ = ["METHODS", "Method", "PLCA", "SourceOnly", "StepOutput", "build_method"]
