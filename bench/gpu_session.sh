#!/usr/bin/env bash
# A GPU session's work in as few device calls as possible: install, the GPU tests, the encoder and
# decoder benchmarks. One device call runs at most 10 minutes and a session has 30 device minutes,
# start-ups included, so run the stages in three calls, each straight after the last (the machine
# stays warm ~30 s; a cold start costs 1-2 minutes), ~26 minutes of commands in all:
#   SAMHQ_FAST_COMMIT=<sha> bash bench/gpu_session.sh OUT_DIR tests,profile     (<= 5 + 4.5 min)
#   SAMHQ_FAST_COMMIT=<sha> bash bench/gpu_session.sh OUT_DIR encoder           (<= 7 min)
#   SAMHQ_FAST_COMMIT=<sha> bash bench/gpu_session.sh OUT_DIR decoder,fp32      (<= 4.5 + 2 min of automatic masks + 2.5)
# (STAGES is required: all five do not fit one call.) fp32: the encoder in float32, eager vs fused
# (bench/NOTES.md prediction 31: whether backend="auto" should pick fused in fp32 too), vit_b then vit_h
# at batch 8, as far as 2.5 minutes go. The device's copy of the tree has no .git:
# SAMHQ_FAST_COMMIT (`git rev-parse HEAD` here, written into the command) names the code in every JSON.
# torch.compile(max-autotune) runs last in the encoder stage and only while 150 s of its budget are
# left, so it may get few configurations (vit_h first); with device time to spare, a fourth call:
#   python3 -m samhq_fast.benchmark.encoder --variants vit_h --batch 8 --dtype bf16 --backends eager,compile \
#       --time-budget-s 450 --compile-reserve-s 0 --output OUT_DIR/encoder-compile-DATE.json
# Writes OUT_DIR/gpu.txt (machine, versions, commit, each stage's exit status), gpu_tests.log,
# block-profile.md + profile.log (one vit_h block, eager vs fused, kernel by kernel), decoder-profile.md
# (one decoder call at 1 / 64 / 256 box prompts, eager vs compiled vs compiled-conv, kernel by kernel),
# encoder-DATE.json / decoder-DATE.json (samhq-fast bench's merged JSON), the encoder plot,
# automatic-masks-{eager,fused}-DATE.json + their log, and autotune.json. The device returns at most
# 8 files per call, so what can be made again is deleted: the per-run part files the benchmarks
# also write (the merged JSON repeats their rows) and the merged JSON's .md table. Copy the merged
# JSON to bench/results/ and make its table there: samhq-fast bench --table X.json > X.md; the
# README table: samhq-fast bench --table bench/results/*.json. Each benchmark rewrites its part
# JSON after every configuration, and a run cut by a stage's SIGINT still writes the merged JSON
# from what it finished (marked "interrupted"); one killed outright (no merged JSON) keeps its part
# JSON, which `--table` reads too (marked incomplete).
# The machine is given back between calls, and with it the autotune cache: each call copies
# autotune.json to OUT_DIR; put it in .gpu_cache/ (git-ignored) and name .gpu_cache in the next
# call's carry, so later stages reuse the tuned configs instead of timing every candidate again.
# (The tests run untuned, SAMHQ_FAST_AUTOTUNE=0 in tests/conftest.py: tuning starts with the profile.)
# tests/test_tiny_vit.py's GPU test compares with the original release, segment_anything_hq, which
# the device image lacks (it has the torchvision and timm the original imports): fetch its wheel
# here first, `pip download segment-anything-hq==0.3 --no-deps -d .whl`, and name .whl in carry too;
# without it that test skips.
set -uo pipefail
usage="usage: bench/gpu_session.sh OUT_DIR STAGES (a comma list of tests, profile, encoder, decoder, fp32; at most ~10 minutes of them)"
out=${1:?$usage}
stages=",${2:?$usage},"
day=$(date +%F)  # once: a session running past midnight still names its files alike
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export SAMHQ_FAST_CACHE_DIR=${SAMHQ_FAST_CACHE_DIR:-$PWD/.gpu_cache}
mkdir -p "$SAMHQ_FAST_CACHE_DIR"
# Saved after every stage (and at exit): a call cut off by the device's time limit still hands on its tuning.
save_tuning() { cp "$SAMHQ_FAST_CACHE_DIR/autotune.json" "$out/" 2>/dev/null || true; }  # none yet: nothing to save
# finish STAGE STATUS [MERGED_JSON], after each stage: its exit status (the script's own is not a
# test result), and no file that can be made again left to crowd the 8 files a call returns: the
# tables (.md) and temporaries, and the part files once the merged JSON holds their rows.
finish() {
    echo "[gpu_session] $1 exit $2" | tee -a "$out/gpu.txt"
    rm -f "$out"/*.tmp "$out"/*-bf16.md "$out"/*-fp32.md
    if [[ -n ${3:-} ]]; then
        rm -f "${3%.json}.md"
        if [[ -f $3 ]]; then
            rm -f "${3%.json}".*-bf16.json "${3%.json}".*-fp32.json
        else
            echo "[gpu_session] $1: no $(basename "$3"): its part JSON is kept" | tee -a "$out/gpu.txt"
        fi
    fi
    save_tuning
}
trap save_tuning EXIT
# No network there. An editable install needs setuptools >= 64 (unknown on the device): else a plain one.
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || python3 -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then python3 -m pip install -q --no-index --no-deps .whl/*.whl; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
echo "samhq-fast commit ${SAMHQ_FAST_COMMIT:-unknown (no SAMHQ_FAST_COMMIT given)}" | tee -a "$out/gpu.txt"
if [[ $stages == *,tests,* ]]; then
    # SIGINT (not TERM) at the limit: pytest still prints the failures it has; 4 workers share the
    # CPU-bound Triton / Inductor compiles; one stuck test cannot eat the stage. Both need plugins
    # (pytest-xdist, pytest-timeout) that --no-deps cannot install: without them, one process.
    # --dist load, not loadfile: test_fused_backend.py alone (real-size vit_b / vit_h, several decoder
    # compiles) could outlast the stage on one worker. A test module that fails to import (a package
    # missing on the device) costs its own tests only.
    # -v: a line per finished test, so a stage killed before pytest's summary still names its failures.
    # The files in priority order (xdist's load scheduling keeps it roughly): if the stage is cut, the
    # kernels and the fused encoder have been checked before the decoder and the image path.
    parallel=()
    if python3 -c "import xdist, pytest_timeout" 2>/dev/null; then parallel=(--timeout=150 -n 4 --dist load); fi
    first=(tests/test_kernels_linear.py tests/test_kernels_attention.py tests/test_kernels_conv3x3.py tests/test_kernel_resources.py tests/test_autotune.py
           tests/test_fused_backend.py tests/test_decoding.py)
    test_files=("${first[@]}")
    for f in tests/test_*.py; do [[ " ${first[*]} " == *" $f "* ]] || test_files+=("$f"); done
    timeout -s INT -k 20 300 python3 -m pytest -m gpu -v -rfE --tb=short --durations=15 "${parallel[@]}" \
        --continue-on-collection-errors -p no:cacheprovider "${test_files[@]}" 2>&1 | tee "$out/gpu_tests.log"
    finish tests "$?"
fi
if [[ $stages == *,profile,* ]]; then
    timeout -s INT -k 20 90 python3 -m samhq_fast.benchmark.profile_block --variant vit_h --batch 1,8 --dtype bf16 \
        --output "$out/block-profile.md" 2>&1 | tee "$out/profile.log" | tail -5
    finish profile "$?"
    # (six decoder compiles, one per prompt bucket and mode, and the conv3x3 tuning: ~2-3 min on a fresh machine)
    timeout -s INT -k 20 180 python3 -m samhq_fast.benchmark.profile_decoder --prompts 1,64,256 --dtype bf16 \
        --output "$out/decoder-profile.md" 2>&1 | tee -a "$out/profile.log" | tail -5
    finish decoder-profile "$?"
fi
if [[ $stages == *,encoder,* ]]; then  # torch.compile(max-autotune) last: its compiles are the slowest
    # Budgeted under the stage's timeout so the run ends itself and writes the merged JSON (and plot).
    # vit_h first: of the slow torch.compile configurations, the one that fits is vit_h's.
    plot=()
    if python3 -c "import matplotlib" 2>/dev/null; then plot=(--plot "$out/encoder-$day.png"); fi
    timeout -s INT -k 20 420 python3 -m samhq_fast.cli bench --what encoder --variant vit_h,vit_b --batch 1,8,32 --dtype bf16 \
        --backends eager,fused,fused-graphed,hf,hf-eager,compile --time-budget-s 330 --output "$out/encoder-$day.json" "${plot[@]}" \
        2>&1 | tee "$out/encoder.log"
    finish encoder "$?" "$out/encoder-$day.json"
fi
if [[ $stages == *,decoder,* ]]; then  # budgeted to finish in < 4.5 min (--time-budget-s 200 + the last configuration)
    # The decoder is the same network for every variant (only e2e includes the encoder): vit_h first.
    # SIGINT at the limit: the merged JSON is still written from the configurations finished.
    timeout -s INT -k 20 270 python3 -m samhq_fast.cli bench --what decoder,e2e --variant vit_h,vit_b --prompts 1,16,64,256,1024 --dtype bf16 \
        --backends eager,compile,fused --time-budget-s 200 --output "$out/decoder-$day.json" 2>&1 | tee "$out/decoder.log"
    finish decoder "$?" "$out/decoder-$day.json"
    # automatic masks (32 x 32 points, vit_h; <= 2 min) where pytest-benchmark is installed: eager,
    # then fused, one pytest run and JSON each: pytest-benchmark writes its JSON when the run ends, so
    # a SIGINT inside a measurement loses the run's whole JSON (the fused run compiles the decoder).
    if python3 -c "import pytest_benchmark" 2>/dev/null; then
        for backend in eager fused; do
            limit=$([[ $backend == eager ]] && echo 50 || echo 70)
            timeout -s INT -k 20 "$limit" python3 -m pytest bench/test_benchmarks.py --benchmark-only -q -k "automatic and vit_h and $backend" \
                --benchmark-json "$out/automatic-masks-$backend-$day.json" 2>&1 | tee -a "$out/automatic-masks.log" | tail -15
            finish "automatic-masks $backend" "$?"
        done
    fi
fi

if [[ $stages == *,fp32,* ]]; then  # budgeted to end itself (merged JSON written) inside its 2.5 minutes
    timeout -s INT -k 20 150 python3 -m samhq_fast.cli bench --what encoder --variant vit_b,vit_h --batch 8 --dtype fp32 \
        --backends eager,fused --time-budget-s 110 --output "$out/encoder-fp32-$day.json" 2>&1 | tee "$out/encoder-fp32.log"
    finish encoder-fp32 "$?" "$out/encoder-fp32-$day.json"
fi
