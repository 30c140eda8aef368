#!/usr/bin/env bash
# The GPU session in one command: run from the repository root on a GPU machine without
# internet, with the wheels of scripts/fetch_gpu_wheels.sh carried in .whl/ (flashinfer).
#
#     bash scripts/gpu_check.sh OUT            # OUT: a folder for the results
#
# 1. installs the carried wheels into /tmp/site (no index, no dependencies: the machine has
#    torch, triton, transformers, peft);
# 2. runs the GPU tests (flashinfer vs torch attention, CUDA graphs vs eager) and the kernel
#    tests natively (bf16, fp16, fp32);
# 3. runs scripts/bench_gpu.py at Qwen3-8B shapes (flashinfer's first plan JIT-compiles for
#    about 75 s; the whole script is sized to finish in about 6 minutes on an H100/H200).
# Everything lands in OUT: versions.txt, tests.log, bench.log, bench_gpu.md, bench_gpu.json.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider -m "gpu or not gpu" \
  tests/test_gpu.py tests/test_kernels.py 2>&1 | tee "$out/tests.log"
timeout 420 python3 scripts/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.log"
