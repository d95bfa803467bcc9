#!/usr/bin/env bash
# The GPU half of the readiness checks (docs/precision.md) as one prepared run on a lent GPU machine, about 9
# minutes on one H200: the conformance suite with CUDA available (its CUDA bf16 test included), then
# benchmarks/gpu/smoke.py on one GPU (and DDP when the machine has several GPUs). Results land in $OUT.
#
# The machine's image has torch, lightning, torchmetrics, timm, einops, tensorboard but not jsonargparse and
# torchdata: carry them as wheels. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl jsonargparse==4.53.0 docstring-parser==0.18.0 \
#       typeshed-client==2.15.0 torchdata==0.11.0
# then with the device tool: run(command="bash benchmarks/gpu/device_check.sh", carry=[".whl"], timeout_s=600)
# and copy $OUT/gpu_smoke.md (+ .json) to benchmarks/results/.
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
# 1. conformance with CUDA available (the CPU checks run too, on the machine's 16 cores)
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_conformance.py tests/test_precision.py -x 2>&1 \
  | tee "$OUT/conformance.log" | tail -5
# 2. every method on one GPU in bf16-mixed (stops starting methods after --time_limit seconds)
timeout 330 python3 benchmarks/gpu/smoke.py --time_limit 240 --out "$OUT/gpu_smoke.md" 2>&1 | tail -40
