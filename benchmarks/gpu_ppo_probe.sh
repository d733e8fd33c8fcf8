#!/usr/bin/env bash
# PPO with gentler updates, two batch sizes side by side: 8 CPU simulator workers each, the learner on CUDA.
# Made for a lent 16-core GPU machine with the packages installed (run from the repository root):
#   OUT=<folder> bash benchmarks/gpu_ppo_probe.sh        (LIMIT=<seconds per run>, default 510)
# Writes OUT/gentle_b1600.log and OUT/gentle_b4000.log (eval lines every 40k env steps, 96 episodes) and the runs'
# tensorboard logs and checkpoints under OUT/w/runs/. Both runs stop (Ctrl-C: checkpoint, exit 130) at LIMIT.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:?set OUT to an output folder}
export PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} HF_HUB_OFFLINE=1
LIMIT=${LIMIT:-510}
mkdir -p "$OUT/w" && cd "$OUT/w" || exit 1
C=(--num-envs 8 --sim-backend physx_cpu --num-eval-envs 8 --num-eval-episodes 96 --eval-freq 40000
   --total-timesteps 400000 --learning-rate 1e-4 --update-epochs 4 --cuda)
timeout -s INT "$LIMIT" python3 "$ROOT/ppo_residual.py" "${C[@]}" --num-steps 200 --exp-name gpu_ppo_gentle_b1600 \
  >"$OUT/gentle_b1600.log" 2>&1 &
timeout -s INT "$LIMIT" python3 "$ROOT/ppo_residual.py" "${C[@]}" --num-steps 500 --exp-name gpu_ppo_gentle_b4000 \
  >"$OUT/gentle_b4000.log" 2>&1 &
wait
grep -H "eval success" "$OUT"/gentle_*.log
