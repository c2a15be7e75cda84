#!/usr/bin/env bash
# Every number of docs/results/flux.md, with our own commands, in order (resumable: a step whose output exists is
# skipped). Run from the repository root after the flow-matching reference is exported into the package.
set -euo pipefail
OUT=docs/results/flux
CAL=$OUT/calibration
mkdir -p "$CAL" "$OUT/s28" "$OUT/s50"
export PYTHONUNBUFFERED=1

# 1. Calibrations: schedules searched for TaylorSeer O=2 on the model output (the DiT's best), at each budget of
#    the issue, fitted linear weights on the output at 6 of 28 and 8 of 50, and on block residuals at 8 of 50 (the
#    recorder joins a tuple output's tensors into one feature, issue #23), and the anchored hybrid (k=1: the first
#    double-stream block computed on every step, its fresh output a regressor of the fitted weights) at 5 of 50.
for spec in "28 5" "28 6" "28 8" "50 6" "50 8" "50 11"; do
  set -- $spec
  f="$CAL/ts2-output-b$2-s$1.safetensors"
  [ -s "$f" ] || taylorseer calibrate --model flux --steps "$1" --budget "$2" --forecaster taylor2 \
      --granularity output --search-images 8 --max-evals 80 --name "ts2-output-b$2-s$1" --out "$f"
done
for spec in "28 6 output" "50 8 output" "50 8 block"; do
  set -- $spec
  f="$CAL/cal-$3-b$2-s$1.safetensors"
  [ -s "$f" ] || taylorseer calibrate --model flux --steps "$1" --budget "$2" --granularity "$3" \
      --search-images 8 --max-evals 80 --name "cal-$3-b$2-s$1" --out "$f"
done

f="$CAL/anchor1-b5-s50.safetensors"
[ -s "$f" ] || python scripts/flux_anchor.py --steps 50 --budget 5 --images 64 --dev-images 16 --evals 50 --out "$f"

# 2. The bench (32 images, seed 0) at 28 and 50 steps: our grid, diffusers' hooks, the calibrated methods.
for s in 28 50; do
  if [ ! -s "$OUT/s$s/report.md" ]; then
    cals=()
    for f in "$CAL"/*-s$s.safetensors; do cals+=(--calibration "$f"); done
    rm -f "$OUT/s$s/records.jsonl"
    taylorseer bench --model flux --steps "$s" --images 32 --repeats 2 --threads 1 "${cals[@]}" \
        --out "$OUT/s$s/records.jsonl"
    taylorseer report "$OUT/s$s/records.jsonl" --out "$OUT/s$s"
  fi
done

# 3. Held out (500 images, seed 5000) and the peers bench (cache-dit through FluxPipeline, one run; issue #23)
python scripts/flux_heldout.py --steps 50 --images 500 \
    --methods anchor1@anchor1-b5-s50,cal-block-b8-s50,anchor1@cal-block-b8-s50 \
    --calibration "$CAL/cal-block-b8-s50.safetensors" --anchored "$CAL/anchor1-b5-s50.safetensors" \
    --out "$OUT/heldout.jsonl"
if [ ! -s "$OUT/peers/report.md" ]; then
  mkdir -p "$OUT/peers"
  python scripts/flux_peers.py --steps 50 --images 32 \
      --calibration "$CAL/ts2-output-b6-s50.safetensors" --calibration "$CAL/ts2-output-b8-s50.safetensors" \
      --calibration "$CAL/ts2-output-b11-s50.safetensors" --calibration "$CAL/cal-block-b8-s50.safetensors" \
      --anchored "$CAL/anchor1-b5-s50.safetensors" \
      --skip spectrum-fc@ts2-output-b6-s50,spectrum-fc@ts2-output-b11-s50,spectrum-fc@cal-block-b8-s50,\
cachedit-F1B0-foca-mask@cal-block-b8-s50,cachedit-F1B0-dmd-mask@cal-block-b8-s50,\
cachedit-F1B1-ts1-mask@cal-block-b8-s50,cachedit-F2B0-ts1-mask@cal-block-b8-s50 \
      --out "$OUT/peers/records.jsonl"
  taylorseer report "$OUT/peers/records.jsonl" --out "$OUT/peers"
fi
