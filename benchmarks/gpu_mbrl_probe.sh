#!/usr/bin/env bash
# Residual MBRL runs side by side on a lent GPU machine, each with its learner (ensemble fits, imagined rollouts, SAC
# updates) either on CUDA or on one CPU thread, and its own CPU simulator workers (2 training envs, as on our 2-core
# machines; ManiSkill's GPU simulator needs a PhysX library those machines cannot download). Answers: what does
# mbrl_residual.py's compute cost per env step with a GPU learner, against a CPU thread on the same machine?
# Made for a machine with the packages installed (run from the repository root):
#   OUT=<folder> bash benchmarks/gpu_mbrl_probe.sh "TAG SEED cuda|cpu [EXTRA FLAGS...]" ...
#   e.g. OUT=/tmp/o bash benchmarks/gpu_mbrl_probe.sh "cuda 1 cuda --reward-lateral 10" "cpu 1 cpu --reward-lateral 10"
# Env: LIMIT (seconds per run, default 480: Ctrl-C, checkpoint, exit 130), NUM_ENVS (2), EVAL_ENVS (5),
#      EVAL_EPISODES (50), EVAL_FREQ (25000), WORK (where the runs go, default OUT/w), DEVICE (words for the JSON;
#      default: the GPU's name, the core count and the learner).
# Writes OUT/<TAG>_s<SEED>.log per run and, per TAG, OUT/mbrl_probe_<TAG>.json (benchmarks/curve.py --collect-only:
# eval success over env steps, steps/s); runs under WORK/runs/. Prints each run's last progress line and its
# learner-time split (seconds of time/model, time/rollout, time/update, time/env, time/eval over the run).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:?set OUT to an output folder}
export PYTHONUNBUFFERED=1 XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} HF_HUB_OFFLINE=1
LIMIT=${LIMIT:-480}
N=${NUM_ENVS:-2}
EPIS=${EVAL_EPISODES:-50}
EVAL_ENVS=${EVAL_ENVS:-5}
FREQ=${EVAL_FREQ:-25000}
GPU=$(nvidia-smi -L 2>/dev/null | head -n 1 | sed -e 's/^GPU [0-9]*: //' -e 's/ (UUID.*//')
WORK=${WORK:-$OUT/w}
mkdir -p "$OUT" "$WORK" && cd "$WORK" || exit 1
learner_flags() { if [ "$1" = cuda ]; then echo "--cuda"; else echo "--no-cuda --threads 1"; fi; }
for job in "$@"; do
  read -r tag seed learner extra <<<"$job"
  # -k 60: a background job of a script starts with SIGINT ignored, so a Ctrl-C that lands before the run installs
  # its handler (env start-up, first evaluation) is lost; then kill it a minute later
  # shellcheck disable=SC2086,SC2046  # flag lists
  timeout -s INT -k 60 "$LIMIT" python3 "$ROOT/mbrl_residual.py" --exp-name "gpumbrl_${tag}_residual_coarse_s$seed" \
    --seed "$seed" --base coarse --total-timesteps 100000 --eval-freq "$FREQ" --num-eval-episodes "$EPIS" \
    --num-envs "$N" --num-eval-envs "$EVAL_ENVS" --sim-backend physx_cpu $(learner_flags "$learner") $extra \
    >"$OUT/${tag}_s$seed.log" 2>&1 &
done
wait
for job in "$@"; do
  read -r tag seed learner extra <<<"$job"
  device=${DEVICE:-"${GPU:-no GPU} machine: $(nproc) cores, $# runs side by side, learner on $learner"}
  # shellcheck disable=SC2086,SC2046
  python3 "$ROOT/benchmarks/curve.py" --script mbrl_residual.py --collect-only --variants residual --seeds "$seed" \
    --num-envs "$N" --num-eval-episodes "$EPIS" --eval-freq "$FREQ" --total-timesteps 100000 --workdir . \
    --run-prefix "gpumbrl_${tag}_" --out "$OUT/mbrl_probe_$tag" --device "$device" --target 0.9 -- \
    --num-eval-envs "$EVAL_ENVS" --sim-backend physx_cpu $(learner_flags "$learner") $extra >/dev/null \
    || echo "collect failed: $tag seed $seed"
done
rm -f "$OUT"/*.lock
for job in "$@"; do
  read -r tag seed learner extra <<<"$job"
  run=$(ls -d runs/gpumbrl_${tag}_residual_coarse_s${seed}__* 2>/dev/null | tail -n 1)
  echo "== $tag seed $seed ($learner learner)"
  grep "eval success" "$OUT/${tag}_s$seed.log" | tail -n 3
  grep "^step .*SPS" "$OUT/${tag}_s$seed.log" | tail -n 1
  [ -n "$run" ] && python3 - "$run" <<'EOF'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
# time/model and time/eval are per round; time/rollout, time/update and time/env run totals
secs = {k: sum(e.value for e in acc.Scalars(k)) for k in ("time/model", "time/eval") if k in tags}
secs.update({k: acc.Scalars(k)[-1].value for k in ("time/rollout", "time/update", "time/env") if k in tags})
print("  seconds in all:", ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
EOF
done
