#!/bin/bash
# The fast plan (one-step shifts first, patience 14, reference from the recording) against the thorough files, held out.
set -e
source /work/venv/bin/activate
cd /tmp/lead_snap; export PYTHONPATH=/tmp/lead_snap/src
export OMP_NUM_THREADS=1
D=/work/runs/lead/fast2
mkdir -p $D
date
python -c "import sys; from taylorseer.cli import main; sys.exit(main())" calibrate --budget 8 --steps 50 --granularity output --forecaster taylor2 --name fast-ts2-output-b8-s50 --out $D/fast-ts2-output-b8-s50.safetensors --force 2>&1 | grep -v "it/s\]" | tail -8
python -c "import sys; from taylorseer.cli import main; sys.exit(main())" calibrate --model flux --budget 8 --steps 50 --forecaster taylor2 --name fast-flux-ts2-output-b8-s50 --out $D/fast-flux-ts2-output-b8-s50.safetensors --force 2>&1 | grep -v "it/s\]" | tail -8
date
python scripts/flux_heldout.py --steps 50 --images 100 --methods fast-flux-ts2-output-b8-s50,ts2-output-b8-s50 \
  --calibration $D/fast-flux-ts2-output-b8-s50.safetensors --calibration docs/results/flux/calibration/ts2-output-b8-s50.safetensors \
  --out $D/flux_heldout.jsonl
date
python scripts/calibration_eval.py --calibration docs/results/calibration/ts2-output-b8-s50.safetensors \
  --calibration $D/fast-ts2-output-b8-s50.safetensors --images 500 --seed 0 --threads 1 --save $D/heldout 2>&1 | grep -v "it/s\]"
date
