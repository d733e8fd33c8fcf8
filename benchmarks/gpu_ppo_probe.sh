#!/usr/bin/env bash
# Residual PPO runs side by side on a lent 16-core GPU machine: CPU simulator workers, the learner on CUDA.
# Made for a machine with the packages installed (run from the repository root):
#   OUT=<folder> bash benchmarks/gpu_ppo_probe.sh                      the two gentle-update runs (RESULTS.md)
#   OUT=<folder> bash benchmarks/gpu_ppo_probe.sh "TAG SEED [FLAGS...]" ...   one run per job, e.g.
#   OUT=/tmp/o NUM_ENVS=5 NUM_STEPS=200 bash benchmarks/gpu_ppo_probe.sh "lat10 1 --reward-lateral 10" "lat10 2 ..."
# Env: LIMIT (seconds per run, default 510: Ctrl-C, checkpoint, exit 130), NUM_ENVS (8), NUM_STEPS (200; batch =
#      NUM_ENVS x NUM_STEPS), EVAL_ENVS (8), EVAL_EPISODES (96), EVAL_FREQ (40000).
# Writes OUT/<TAG>_s<SEED>.log per job (OUT/gentle_b1600.log and OUT/gentle_b4000.log without jobs): eval lines and
# progress lines; the runs' tensorboard logs and checkpoints go under OUT/w/runs/.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:?set OUT to an output folder}
export PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} HF_HUB_OFFLINE=1
LIMIT=${LIMIT:-510}
mkdir -p "$OUT/w" && cd "$OUT/w" || exit 1
C=(--num-envs "${NUM_ENVS:-8}" --sim-backend physx_cpu --num-eval-envs "${EVAL_ENVS:-8}"
   --num-eval-episodes "${EVAL_EPISODES:-96}" --eval-freq "${EVAL_FREQ:-40000}" --total-timesteps 400000 --cuda)
if [ $# -eq 0 ]; then  # the gentle-update probe of 2026-11-26 (benchmarks/results/gpu/COMMANDS.md)
  set -- "gentle_b1600 1 --learning-rate 1e-4 --update-epochs 4 --num-steps 200" \
         "gentle_b4000 1 --learning-rate 1e-4 --update-epochs 4 --num-steps 500"
  NAMED=1
fi
for job in "$@"; do
  read -r tag seed extra <<<"$job"
  log="$OUT/${tag}_s$seed.log"
  steps=(--num-steps "${NUM_STEPS:-200}")
  [ -n "${NAMED:-}" ] && log="$OUT/$tag.log" && steps=()  # these jobs name their own --num-steps
  # -k 60: a background job of a script starts with SIGINT ignored, so a Ctrl-C that lands before the run installs
  # its handler (env start-up, first evaluation) is lost; then kill it a minute later
  # shellcheck disable=SC2086  # a flag list
  timeout -s INT -k 60 "$LIMIT" python3 "$ROOT/ppo_residual.py" "${C[@]}" "${steps[@]}" --seed "$seed" \
    --exp-name "gpu_ppo_${tag}_s$seed" $extra >"$log" 2>&1 &
done
wait
grep -H "eval success" "$OUT"/*.log
