#!/usr/bin/env bash
# Residual SAC runs side by side on a lent 16-core GPU machine, for more seeds and variants than 2 CPU cores allow.
# Each run: its own CPU simulator workers and its learner on the CPU (one thread). An update of these small networks
# is launch-bound on a GPU (~14 ms on an H200 at batch 256, see RESULTS.md "GPU measurements"), slower than one CPU
# thread.
# Made for a machine with the packages installed (run from the repository root):
#   OUT=<folder> bash benchmarks/gpu_sac_probe.sh "TAG SEED [EXTRA FLAGS...]" ...
#   e.g. OUT=/tmp/o bash benchmarks/gpu_sac_probe.sh "scale0.2 3 --residual-scale 0.2" "scale0.1 1"
# Env: LIMIT (seconds per run, default 480: Ctrl-C, checkpoint, exit 130), NUM_ENVS (3), EVAL_ENVS (5),
#      EVAL_EPISODES (50), EVAL_FREQ (25000), WORK (where the runs go, default OUT/w), DEVICE (words for the JSON;
#      default: the GPU's name and the core count).
# Writes OUT/<TAG>_s<SEED>.log per run and, per TAG, OUT/sac_probe_<TAG>.json (benchmarks/curve.py --collect-only:
# eval success over env steps, steps/s); runs under WORK/runs/.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:?set OUT to an output folder}
export PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} HF_HUB_OFFLINE=1
LIMIT=${LIMIT:-480}
N=${NUM_ENVS:-3}
EPIS=${EVAL_EPISODES:-50}
EVAL_ENVS=${EVAL_ENVS:-5}
FREQ=${EVAL_FREQ:-25000}
GPU=$(nvidia-smi -L 2>/dev/null | head -n 1 | sed -e 's/^GPU [0-9]*: //' -e 's/ (UUID.*//')
DEVICE=${DEVICE:-"${GPU:-no GPU} machine, its CPUs: $(nproc) cores, $# runs side by side, learner on the CPU"}
WORK=${WORK:-$OUT/w}
mkdir -p "$OUT" "$WORK" && cd "$WORK" || exit 1
for job in "$@"; do
  read -r tag seed extra <<<"$job"
  # -k 60: a background job of a script starts with SIGINT ignored, so a Ctrl-C that lands before the run installs
  # its handler (env start-up, first evaluation) is lost; then kill it a minute later
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  timeout -s INT -k 60 "$LIMIT" python3 "$ROOT/sac_residual.py" --exp-name "gpuprobe_${tag}_residual_coarse_s$seed" \
    --seed "$seed" --base coarse --total-timesteps 200000 --eval-freq "$FREQ" --num-eval-episodes "$EPIS" \
    --num-envs "$N" --num-eval-envs "$EVAL_ENVS" --sim-backend physx_cpu --no-cuda $extra \
    >"$OUT/${tag}_s$seed.log" 2>&1 &
done
wait
for job in "$@"; do
  read -r tag seed extra <<<"$job"
  # shellcheck disable=SC2086
  python3 "$ROOT/benchmarks/curve.py" --collect-only --variants residual --seeds "$seed" --num-envs "$N" \
    --num-eval-episodes "$EPIS" --eval-freq "$FREQ" --workdir . --run-prefix "gpuprobe_${tag}_" \
    --out "$OUT/sac_probe_$tag" --device "$DEVICE" --target 0.9 -- --num-eval-envs "$EVAL_ENVS" \
    --sim-backend physx_cpu --no-cuda $extra >/dev/null || echo "collect failed: $tag seed $seed"
done
grep -H "eval success\|SPS" "$OUT"/*.log | tail -n 60
