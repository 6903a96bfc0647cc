#!/usr/bin/env bash
# Creates .venv from nothing: CPU torch first on machines without CUDA (a bare `torch` requirement would
# pull the newest CUDA build, several GB), then the package with its pins, then the CPU-only fixes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
CPU_TORCH=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
else
  gpu=0
  $PIP install -q "torch==$CPU_TORCH"
  echo "torch==$CPU_TORCH" > "$constraints"
fi
$PIP install -q -c "$constraints" -e ".[dev]"

if [ "$gpu" = 0 ]; then
  # PyPI's torchvision is a CUDA build: next to CPU torch it breaks `import lmms_eval.api.registry`
  # (operator torchvision::nms does not exist). Nothing in vlcache needs it.
  $PIP uninstall -y -q torchvision || true
fi

"$VENV/bin/python" -c "import lmms_eval.evaluator, transformers, hydra, triton, torch; print('vlcache env: torch', torch.__version__, '| transformers', transformers.__version__)"
if ! command -v java >/dev/null 2>&1; then
  echo "NOTE: no 'java' on PATH. COCO caption metrics (pycocoevalcap: PTB tokenizer, METEOR, CIDEr) need it." >&2
  echo "      Fix: apt-get install -y default-jre-headless   (Debian/Ubuntu)" >&2
fi
touch "$VENV/.installed"
