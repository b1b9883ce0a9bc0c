#!/usr/bin/env bash
# A GPU session's work in as few device calls as possible: install, the GPU tests, the encoder and
# decoder benchmarks. One device call runs at most 10 minutes, so run the stages in three calls
# (~25 of a session's 30 device minutes with the machine's start-ups):
#   bash bench/gpu_session.sh OUT_DIR tests,profile     (~5 + ~1 min)
#   bash bench/gpu_session.sh OUT_DIR encoder           (~7-8 min)
#   bash bench/gpu_session.sh OUT_DIR decoder           (~5.5 min)
# Writes OUT_DIR/gpu_tests.log, OUT_DIR/block-profile.md (one vit_h block, eager vs fused, kernel by kernel), OUT_DIR/encoder-DATE.json, OUT_DIR/decoder-DATE.json (samhq-fast bench's
# merged JSON, plus per-run parts *.encoder-bf16.json ...) and their .md (copy them to bench/results/;
# the README table: samhq-fast bench --table bench/results/*.json). Each benchmark rewrites its JSON after every configuration, so a
# run cut short by a time limit still leaves what it finished.
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUT_DIR [tests,encoder,decoder]}
stages=",${2:-tests,profile,encoder,decoder},"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
if [[ $stages == *,tests,* ]]; then
    timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
fi
if [[ $stages == *,profile,* ]]; then
    timeout 90 python3 -m samhq_fast.benchmark.profile_block --variant vit_h --batch 1,8 --dtype bf16 \
        --output "$out/block-profile.md" 2>&1 | tail -5
fi
if [[ $stages == *,encoder,* ]]; then
    python3 -m samhq_fast.cli bench --what encoder --variant vit_b,vit_h --batch 1,8,32 --dtype bf16 \
        --backends eager,fused,fused-graphed,hf,compile --output "$out/encoder-$(date +%F).json" --plot "$out/encoder-$(date +%F).png"
fi
if [[ $stages == *,decoder,* ]]; then  # budgeted to finish in < 5 min (--time-budget-s 220 + the last configuration)
    timeout 330 python3 -m samhq_fast.cli bench --what decoder,e2e --variant vit_b,vit_h --prompts 1,16,64,256,1024 --dtype bf16 \
        --backends eager,compile,fused --output "$out/decoder-$(date +%F).json" 2>&1 | tee "$out/decoder.log"
fi
