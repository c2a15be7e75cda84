#!/usr/bin/env bash
# Every number of docs/results/flux.md, with our own commands, in order (resumable: a step whose output exists is
# skipped). Run from the repository root after the flow-matching reference is exported into the package.
set -euo pipefail
OUT=docs/results/flux
CAL=$OUT/calibration
mkdir -p "$CAL" "$OUT/s28" "$OUT/s50"
export PYTHONUNBUFFERED=1

# 1. Calibrations: schedules searched for TaylorSeer O=2 on the model output (the DiT's best), at each budget of
#    the issue, and fitted linear weights on the output at 6 of 28 and 8 of 50. (Block and module granularity
#    cannot be calibrated on FLUX yet: its double-stream blocks and attentions return tuples, which the recorder
#    refuses; the hybrid runs with Taylor forecasts on block residuals instead: anchor1-ts*-block@... .)
for spec in "28 5" "28 6" "28 8" "50 6" "50 8" "50 11"; do
  set -- $spec
  f="$CAL/ts2-output-b$2-s$1.safetensors"
  [ -s "$f" ] || taylorseer calibrate --model flux --steps "$1" --budget "$2" --forecaster taylor2 \
      --granularity output --search-images 8 --max-evals 80 --name "ts2-output-b$2-s$1" --out "$f"
done
for spec in "28 6 output" "50 8 output"; do
  set -- $spec
  f="$CAL/cal-$3-b$2-s$1.safetensors"
  [ -s "$f" ] || taylorseer calibrate --model flux --steps "$1" --budget "$2" --granularity "$3" \
      --search-images 8 --max-evals 80 --name "cal-$3-b$2-s$1" --out "$f"
done

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
