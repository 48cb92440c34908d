#!/usr/bin/env bash
# Everything bwarea checks on a GPU, in one run of at most ~8 minutes: the GPU benchmarks (benchmarks/bench_gpu.py,
# released 2.7B shape, bf16) and then the decode backends' equivalence tests and the CUDA generation test.
#
#   bash benchmarks/bench_gpu.sh                 # JSON and logs into benchmarks/results/
#   bash benchmarks/bench_gpu.sh /tmp/out 200    # elsewhere, with a 200-second benchmark budget
#
# Runs from a checkout without installing (PYTHONPATH=src); needs torch with CUDA, transformers, tokenizers,
# safetensors, accelerate, tqdm and pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
BUDGET=${2:-300}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="src:tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

card=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
timeout $((BUDGET + 60)) "$PY" benchmarks/bench_gpu.py --budget "$BUDGET" --out "$OUT/gpu-$card.json" 2>&1 \
    | tee "$OUT/gpu-$card-bench.log"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_backends.py \
    "tests/test_generation.py::test_cuda_decoding_equals_recomputation" 2>&1 | tee "$OUT/gpu-$card-tests.log"
