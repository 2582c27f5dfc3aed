#!/usr/bin/env bash
# The peer of benchmarks/sparsity_quant.py, llm-compressor, in a virtualenv of its own (its pins on
# transformers and compressed-tensors differ from ours).
#   bash benchmarks/peer_setup.sh            # creates /tmp/peer-venv (PEER_VENV=... to change it)
# torch goes in first, pinned, so that pip resolves llmcompressor against it instead of pulling a
# CUDA build: a CPU wheel of that version is found through pip's configured find-links where the
# machine has one; elsewhere set TORCH_INDEX (e.g. the CPU wheel index) to pick the build.
set -euo pipefail

PEER_VENV="${PEER_VENV:-/tmp/peer-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LLMCOMPRESSOR_SPEC="${LLMCOMPRESSOR_SPEC:-llmcompressor}"

if [ ! -x "$PEER_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$PEER_VENV"
fi
PIP=("$PEER_VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ -n "${TORCH_INDEX:-}" ]; then
  "${PIP[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX"
else
  "${PIP[@]}" "$TORCH_SPEC"
fi
# keep the installed torch: a resolver that wanted another one fails here instead of downloading CUDA
"${PIP[@]}" "$LLMCOMPRESSOR_SPEC" "$TORCH_SPEC"
"$PEER_VENV/bin/python" - <<'EOF'
import torch, llmcompressor, compressed_tensors, transformers
assert not torch.version.cuda, f"the peer venv got a CUDA torch ({torch.__version__}); reinstall a CPU build"
print(f"peer venv ready: llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}")
EOF
