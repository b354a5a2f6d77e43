"""Reading tensor files safely: the one place where the project calls ``torch.load``.

Pickled files (``.pt``, ``.pth``, ``.bin``) are read with ``weights_only=True``, so a file
that carries code is refused, never run; ``.safetensors`` files are read with safetensors.
Every failure is an :class:`UnreadableFileError` whose message names the file and says
what is wrong in one line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class UnreadableFileError(ValueError):
    """A file is missing, empty, truncated, of another format, or refused for safety."""


def _detail(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_torch_file(path: str | Path, what: str = "file", mmap: bool = False) -> Any:
    """The object in a ``torch.save`` file, read with ``weights_only=True`` on the CPU.

    ``what`` names the file's role in messages ("checkpoint", "weights file").
    ``mmap`` maps the tensors instead of reading them (zip files only; other files are
    then read normally).
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError(f"{what} '{path}' does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"{what} '{path}' is empty (0 bytes): an interrupted copy or download?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise UnreadableFileError(
                f"{what} '{path}' contains code or non-tensor objects and is not loaded for safety (a file that "
                f"could run code is refused for safety; only plain tensors and containers are accepted: re-save "
                f"it as a state dict or .safetensors)"
            ) from None
        raise UnreadableFileError(f"{what} '{path}' is not a readable PyTorch file: {_detail(error)}") from None
    except RuntimeError as error:
        if mmap and "mmap" in str(error):  # legacy (non-zip) files cannot be memory-mapped
            return load_torch_file(path, what, mmap=False)
        raise UnreadableFileError(_unreadable(path, what, error)) from None
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise UnreadableFileError(_unreadable(path, what, error)) from None


def _unreadable(path: Path, what: str, error: BaseException) -> str:
    return f"{what} '{path}' is not a readable PyTorch file (truncated or another format): {_detail(error)}"


def read_safetensors(path: str | Path, what: str = "weights file") -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the string metadata of a ``.safetensors`` file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError(f"{what} '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise UnreadableFileError(f"{what} '{path}' is not a readable .safetensors file: {_detail(error)}") from None
    return tensors, metadata


def read_safetensors_metadata(path: str | Path, what: str = "weights file") -> dict[str, str]:
    """Only the string metadata of a ``.safetensors`` file (no tensor is read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError(f"{what} '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001
        raise UnreadableFileError(f"{what} '{path}' is not a readable .safetensors file: {_detail(error)}") from None
