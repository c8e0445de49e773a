#!/usr/bin/env bash
# bench.py's GPU mode, sized to finish in under 8 minutes on one H100 (16 CPU cores); needs no
# internet and no published weights (the full-size policies are random-initialised on the GPU).
#
#   OUT=/some/folder bash scripts/gpu_bench.sh
#
# Writes, under $OUT (default runs/bench_gpu): gpu.csv (nvidia-smi), policies.json / policies.log
# (tiny and full-size policies: act, forward, Stage I step and Stage II update times, peak GPU
# memory, model FLOPs, MFU) and sim.json / sim.log (GPU-parallel sim with 64 and 256 envs, stock
# PickCube-v1 alongside, one Stage II iteration with 64 envs). The policies run first, so that a
# slow sim start-up cannot cost the full-size figures; each part has its own time limit, and
# bench.py rewrites its JSON after every measurement, so a part cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench_gpu}
mkdir -p "$OUT"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee "$OUT/torch.txt"

# ~3.5 min: 2 tiny + 5 full-size configurations, one fresh process each
timeout 240 "$PY" bench.py --device cuda --sim-backend gpu --tasks --no-pick-cube --stage2-policies \
    --sizes tiny full --batch-size 8 --steps 3 --timeout 150 \
    --out "$OUT/policies.json" 2>&1 | tee "$OUT/policies.log"

# ~3.5 min: 2 tasks x {64, 256} envs and PickCube-v1 x {64, 256}, one process each; Stage II at 64 envs
timeout 230 "$PY" bench.py --device cuda --sim-backend gpu --tasks pick_and_place open_drawer \
    --num-envs 64 256 --env-steps 50 --stage2-num-envs 64 --policy-kinds --timeout 120 \
    --out "$OUT/sim.json" 2>&1 | tee "$OUT/sim.log"
echo "written: $OUT"
