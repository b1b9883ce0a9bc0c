#!/usr/bin/env bash
# A GPU session's work in as few device calls as possible: install, the GPU tests, the encoder and
# decoder benchmarks. One device call runs at most 10 minutes, so run the stages in three calls
# (~25 of a session's 30 device minutes with the machine's start-ups):
#   bash bench/gpu_session.sh OUT_DIR tests,profile     (<= 6.5 + 2 min, under the 10-minute cap)
#   bash bench/gpu_session.sh OUT_DIR encoder           (<= 8.5 min)
#   bash bench/gpu_session.sh OUT_DIR decoder           (~5.5 min + 2.5 min of automatic masks)
# Writes OUT_DIR/gpu_tests.log, OUT_DIR/block-profile.md (one vit_h block, eager vs fused, kernel by
# kernel), OUT_DIR/encoder-DATE.json, OUT_DIR/decoder-DATE.json (samhq-fast bench's merged JSON, plus
# per-run parts *.encoder-bf16.json ...) and their .md. Copy the merged encoder-DATE.json /
# decoder-DATE.json (+ .md) to bench/results/, not the parts (they repeat the merged runs' rows);
# the README table: samhq-fast bench --table bench/results/*.json. Each benchmark rewrites its JSON
# after every configuration, and a run cut by a stage's SIGINT still writes the merged JSON from
# what it finished (marked "interrupted").
# The machine is given back between calls, and with it the autotune cache: each call copies
# autotune.json to OUT_DIR; put it in .gpu_cache/ (git-ignored) and name .gpu_cache in the next
# call's carry, so later stages reuse the tuned configs instead of timing every candidate again.
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUT_DIR [tests,profile,encoder,decoder]}
stages=",${2:-tests,profile,encoder,decoder},"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export SAMHQ_FAST_CACHE_DIR=${SAMHQ_FAST_CACHE_DIR:-$PWD/.gpu_cache}
mkdir -p "$SAMHQ_FAST_CACHE_DIR"
# Saved after every stage (and at exit): a call cut off by the device's time limit still hands on its tuning.
save_tuning() { cp "$SAMHQ_FAST_CACHE_DIR/autotune.json" "$out/" 2>/dev/null; }
trap save_tuning EXIT
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
if [[ $stages == *,tests,* ]]; then
    # SIGINT (not TERM) at the limit: pytest still prints the failures it has; 4 workers share the
    # CPU-bound Triton / Inductor compiles; one stuck test cannot eat the stage. Both need plugins
    # (pytest-xdist, pytest-timeout) that --no-deps cannot install: without them, one process.
    # --dist load, not loadfile: test_fused_backend.py alone (real-size vit_b / vit_h, several decoder
    # compiles) could outlast the stage on one worker. A test module that fails to import (a package
    # missing on the device) costs its own tests only.
    parallel=()
    if python3 -c "import xdist, pytest_timeout" 2>/dev/null; then parallel=(--timeout=150 -n 4 --dist load); fi
    timeout -s INT -k 20 360 python3 -m pytest -m gpu -q -rfE --tb=short "${parallel[@]}" \
        --continue-on-collection-errors -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
    save_tuning
fi
if [[ $stages == *,profile,* ]]; then
    timeout -s INT -k 20 120 python3 -m samhq_fast.benchmark.profile_block --variant vit_h --batch 1,8 --dtype bf16 \
        --output "$out/block-profile.md" 2>&1 | tail -5
    save_tuning
fi
if [[ $stages == *,encoder,* ]]; then  # torch.compile(max-autotune) last: its compiles are the slowest
    # Budgeted under the stage's timeout so the run ends itself and writes the merged JSON (and plot);
    # the timeout leaves ~1.5 min of the call's 10 for the install, the imports and the tuning copy.
    plot=()
    if python3 -c "import matplotlib" 2>/dev/null; then plot=(--plot "$out/encoder-$(date +%F).png"); fi
    timeout -s INT -k 20 480 python3 -m samhq_fast.cli bench --what encoder --variant vit_b,vit_h --batch 1,8,32 --dtype bf16 \
        --backends eager,fused,fused-graphed,hf,hf-eager,compile --time-budget-s 360 --output "$out/encoder-$(date +%F).json" "${plot[@]}" \
        2>&1 | tee "$out/encoder.log"
    save_tuning
fi
if [[ $stages == *,decoder,* ]]; then  # budgeted to finish in < 5.5 min (--time-budget-s 250 + the last configuration)
    # The decoder is the same network for every variant (only e2e includes the encoder): vit_h first.
    # SIGINT at the limit: the merged JSON is still written from the configurations finished.
    timeout -s INT -k 20 330 python3 -m samhq_fast.cli bench --what decoder,e2e --variant vit_h,vit_b --prompts 1,16,64,256,1024 --dtype bf16 \
        --backends eager,compile,fused --time-budget-s 250 --output "$out/decoder-$(date +%F).json" 2>&1 | tee "$out/decoder.log"
    # automatic masks (32 x 32 points, eager vs fused; <= 2.5 min), where pytest-benchmark is installed
    if python3 -c "import pytest_benchmark" 2>/dev/null; then
        timeout -s INT -k 20 150 python3 -m pytest bench/test_benchmarks.py --benchmark-only -q -k automatic \
            --benchmark-json "$out/automatic-masks-$(date +%F).json" 2>&1 | tail -15
    fi
fi
