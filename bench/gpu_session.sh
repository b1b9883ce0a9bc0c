#!/usr/bin/env bash
# Everything a GPU session needs in one device call: install, the GPU tests, the encoder benchmark.
#   bash bench/gpu_session.sh OUT_DIR [BENCH_ARGS...]
# Writes OUT_DIR/gpu_tests.log, OUT_DIR/encoder-DATE.json and .md (copy them to bench/results/).
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUT_DIR [bench args]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -m gpu -q -x -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
python3 bench/bench_encoder.py --variants vit_b,vit_h --batch 1,8,32 --dtype bf16 \
    --backends eager,fused,hf,compile --output "$out/encoder-$(date +%F).json" "$@"
