#!/usr/bin/env bash
# llama.cpp for CPU through the npm package node-llama-cpp (prebuilt linux-x64 binaries; no compiler, seconds), to
# run GGUF LoRA exports (README "llama.cpp and Ollama (GGUF LoRA)"; tests/integrations/test_gguf.py uses it).
#   bash tools/setup_llama_cpp.sh [DIR]   default ~/.cache/kasa_ds/node-llama-cpp; needs node >= 20 and npm;
#                                         prints the package's entry file (DIR/node_modules/node-llama-cpp/dist/index.js)
# Re-running is cheap: a complete install (DIR/.complete) is kept.
set -euo pipefail
DIR=${1:-$HOME/.cache/kasa_ds/node-llama-cpp}
VERSION=3.21.1
ENTRY="$DIR/node_modules/node-llama-cpp/dist/index.js"
if [ -f "$DIR/.complete" ] && [ -f "$ENTRY" ]; then
  echo "$ENTRY"; exit 0
fi
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found: install Node.js >= 20 (with npm)" >&2; exit 1; }
done
rm -rf "$DIR"
mkdir -p "$DIR"
( cd "$DIR" && npm init -y >/dev/null && npm install --no-audit --no-fund "node-llama-cpp@$VERSION" >&2 )
# every platform's prebuilt binaries arrive (about 700 MB, CUDA and Vulkan builds included); on linux-x64 keep the
# CPU build only (other platforms keep all: their GPU builds are what node-llama-cpp picks there)
PLATFORM=$(node -p 'process.platform + "-" + process.arch')
if [ "$PLATFORM" = linux-x64 ]; then
  find "$DIR/node_modules/@node-llama-cpp" -mindepth 1 -maxdepth 1 ! -name linux-x64 -exec rm -rf {} +
fi
node --input-type=module -e "await import('$ENTRY')" >&2
touch "$DIR/.complete"
echo "$ENTRY"
