#!/usr/bin/env bash
# Installs everything booth needs on a fresh machine: system packages, PyTorch, booth itself with its
# development tools. Keeps a PyTorch that is already installed (a CUDA build stays a CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# 1. PyTorch first: the pinned CPU build unless some torch is already there.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
TORCH_PIN=$("$PY" -c "import torch; print('torch==' + torch.__version__)")

# 2. booth and its dependencies, with torch held at the installed build.
"$PY" -m pip install --quiet -e ".[dev]" -c <(echo "$TORCH_PIN")

# 3. Data-only package: the CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) that booth builds offline
#    tokenizers from. Only its data file is read, so its runtime dependencies (torchvision) are not needed.
"$PY" -m pip install --quiet --no-deps open-clip-torch==3.3.0

# 4. The emoji art booth-mini is built from (Debian font, PyPI, npm); see tools/install-data.sh.
bash tools/install-data.sh

echo "booth installed: $("$PY" -c 'import booth, torch; print(booth.__version__, "torch", torch.__version__)')"
