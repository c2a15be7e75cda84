#!/bin/bash
# The fast plan (2d5ba63) at module granularity (fitted weights, on-policy refit) against the thorough default, held out.
while pgrep -f speed6.sh > /dev/null; do sleep 20; done
set -e
source /work/venv/bin/activate
cd /tmp/lead_snap; export PYTHONPATH=/tmp/lead_snap/src OMP_NUM_THREADS=1
D=/work/runs/lead/fastmod; mkdir -p $D
date
python -c "import sys; from taylorseer.cli import main; sys.exit(main())" calibrate --budget 8 --steps 50 --search fast --name fast-mv-b8-s50 --out $D/fast-mv-b8-s50.safetensors --force 2>&1 | grep -v "it/s\]" | tail -8
date
python scripts/calibration_eval.py --calibration docs/results/calibration/cal-b8-s50-mv.safetensors \
  --calibration $D/fast-mv-b8-s50.safetensors --images 500 --seed 0 --threads 1 --weights-only --save $D/heldout 2>&1 | grep -v "it/s\]"
date
