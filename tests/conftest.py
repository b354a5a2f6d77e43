"""Shared test set-up: ``tests/`` on ``sys.path`` (helpers such as ``tiny_runs``) and the torchvision shim."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

#: the torchvision operator library the shim defines; kept alive here, since a dropped Library
#: object takes its definitions with it
_TORCHVISION_SHIM = None


def _declare_torchvision_ops_if_its_library_fails() -> None:
    """Let ``import torchvision`` (and so ``import timm``) work beside a torchvision whose compiled ops
    cannot load, as on a CPU machine with the registry's CUDA build of torchvision 0.28.0 for torch 2.13.

    That torchvision registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` at import
    without checking that its ops library loaded, so the import fails on operators that do not exist.
    Declaring their two schemas (the ones torchvision's C++ defines) lets the import finish; calling
    them still fails, which timm's backbones never do. Nothing happens when torchvision is absent or its
    library loads.
    """
    global _TORCHVISION_SHIM
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or "torchvision" in sys.modules:
        return
    import torch

    libraries = sorted(pathlib.Path(spec.origin).parent.glob("_C*.so")) + sorted(
        pathlib.Path(spec.origin).parent.glob("_C*.pyd"))
    try:
        if not libraries:
            raise OSError("torchvision has no compiled _C library")
        torch.ops.load_library(str(libraries[0]))
        return
    except (OSError, ImportError, RuntimeError):
        pass
    _TORCHVISION_SHIM = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        _TORCHVISION_SHIM.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_declare_torchvision_ops_if_its_library_fails()


def _one_thread_per_parallel_worker() -> None:
    """Under ``pytest -n N`` (pytest-xdist) every worker takes one intra-op thread: N workers of the
    default torch thread count would oversubscribe the cores they share."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


_one_thread_per_parallel_worker()
