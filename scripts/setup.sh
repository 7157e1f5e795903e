#!/usr/bin/env bash
# Make .venv/ with llmtrain installed in it (editable), from a fresh clone.
#   bash scripts/setup.sh          the package and what it needs to run
#   bash scripts/setup.sh --dev    also the test tools (pytest, transformers for parity tests)
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build (requirements/cpu.txt)
# first, so pip never pulls the multi-GB CUDA build; with a GPU, pip takes torch>=2.4 as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" -r requirements/cpu.txt
fi
"${pip[@]}" -e ".$extras"
.venv/bin/python -c "import torch, llmtrain; print(f'llmtrain {llmtrain.__version__} ready in .venv (torch {torch.__version__})')"
