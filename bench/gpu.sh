#!/usr/bin/env bash
# One command for the GPU checks on a lent H100/H200 (see docs/gpu.md). Run from the repository root:
#   bash bench/gpu.sh            # logs and JSON under ${OUT:-/tmp/dg-gpu}
# 1. CUDA build of the pinned ggml via llama-cpp-python; 2. GPU tests (GPU vs CPU parity); 3. a synthetic
# file with the full 26B-A4B layout in the asym-2bitexp types; 4. bench (+ transformers bf16 on the mid-size
# config, same process); 5. batched denoising throughput.
set -euo pipefail
OUT=${OUT:-/tmp/dg-gpu}; mkdir -p "$OUT"
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
start=$(date +%s)
python -m venv --system-site-packages .venv-gpu
.venv-gpu/bin/pip install -q --no-build-isolation --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36 2>&1 | tail -3 | tee "$OUT/build.log"
.venv-gpu/bin/pip install -q --no-deps . pytest 2>&1 | tail -2
echo "build_seconds $(( $(date +%s) - start ))" | tee -a "$OUT/build.log"
.venv-gpu/bin/python -c "import diffgemma as dg; print(dg.backends())" | tee "$OUT/backends.txt"
.venv-gpu/bin/python -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_golden.py 2>&1 | tail -5 | tee "$OUT/tests.log"
.venv-gpu/bin/python bench/full_layout.py --recipe asym-2bitexp --out "$OUT" 2>&1 | tee "$OUT/full_layout.log"
# 5. batched denoising on the GPU: tokens/s at max batch 1, 2, 4, 8 on the proportional config (library only).
.venv-gpu/bin/python bench/batch_throughput.py --threads 16 --no-server --json "$OUT/batch.json" 2>&1 | tee "$OUT/batch.log"
