#!/usr/bin/env bash
# The one command for a lent GPU machine (benchmarks/README.md, "Running the GPU scripts on a lent GPU
# machine"): from the repository root, with the diffusers wheel carried in .whl and $OUT the folder whose
# files come back. gpu_smoke.py first (it names what is broken), then gpu.py; each under its own timeout so
# that both together end inside a 600 s command, and each writes its JSON as it goes (a cut keeps the rest).
#
#   FPEDIT_COMMIT=<short hash> bash benchmarks/device_run.sh   # the copy there has no .git; the JSON records it
#   (SMOKE_S / GPU_S override the two timeouts, in seconds)
#
# Without a GPU both scripts say so and run their CPU dry runs instead, which is how this was rehearsed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
SMOKE_S="${SMOKE_S:-200}"
GPU_S="${GPU_S:-330}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH=/tmp/site
mkdir -p "$OUT"
started=$SECONDS
if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then  # fail in a second, not after minutes of imports
  echo "device_run: no .whl/diffusers-*.whl here: fetch it (benchmarks/README.md) and carry .whl" | tee "$OUT/env.txt"
  exit 2
fi
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo "${FPEDIT_COMMIT:-unknown: pass FPEDIT_COMMIT}")"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
  python3 - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("diffusers", "transformers", "huggingface_hub", "numpy", "safetensors", "tokenizers", "peft",
             "accelerate", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "pillow"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
EOF
} 2>&1 | tee "$OUT/env.txt"
if ! python3 -c "import diffusers" >>"$OUT/env.txt" 2>&1; then
  echo "device_run: diffusers does not import (see $OUT/env.txt)" | tee -a "$OUT/env.txt"
  exit 2
fi

timeout -k 10 "$SMOKE_S" python3 benchmarks/gpu_smoke.py --json "$OUT/gpu-smoke.json" 2>&1 | tee "$OUT/gpu-smoke.log"
smoke=${PIPESTATUS[0]}
timeout -k 10 "$GPU_S" python3 benchmarks/gpu.py --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
gpu=${PIPESTATUS[0]}
echo "device_run: gpu_smoke.py exit $smoke, gpu.py exit $gpu (124: cut by its timeout), $((SECONDS - started)) s" |
  tee -a "$OUT/env.txt"
