#!/usr/bin/env bash
# One-shot check on a GPU machine (deps installed, run from anywhere): what runs there and how fast.
#   1. the GPU (nvidia-smi -L, torch.cuda.get_device_name);
#   2. a CPU-sim env (2 workers) and SAPIEN's render devices (ManiSkill renders through Vulkan even for state);
#      then ManiSkill's GPU simulation (physx_cuda): one attempt, its exit code and error. SAPIEN downloads
#      libPhysXGpu_64.so from GitHub on first use, so an offline machine fails here;
#   3. the CUDA learner with CPU simulation: sac_residual.py and ppo_residual.py, --sim-backend physx_cpu,
#      one env worker per core, tiny evals; their steps/s (charts/SPS), the env's own steps/s (charts/env_SPS) and
#      the time split (time/update, time/rollout, time/env) from their tensorboard logs;
#   4. raw env steps/s with the same CPU workers (benchmarks/env_overhead.py, one short round);
#   5. tests/test_env.py with CUDA present (its GPU-sim test only if step 2 worked).
# Writes OUT_DIR/gpu_check.json and OUT_DIR/steps.log (every step's full output) and prints a table.
# Each step has its own timeout, and all of them share GPU_CHECK_BUDGET seconds (default 330).
#   bash benchmarks/gpu_check.sh [OUT_DIR]     (default benchmarks/results/gpu)
# Sizes: GPU_CHECK_NUM_ENVS (default: the core count, at most 16), GPU_CHECK_SAC_STEPS (12000),
# GPU_CHECK_PPO_STEPS (9600, i.e. 6 PPO iterations of 16 envs x 100 steps), GPU_CHECK_ENV_STEPS (200 vector steps).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
NPROC=$(nproc)
N=${GPU_CHECK_NUM_ENVS:-$((NPROC < 16 ? NPROC : 16))}
SAC_STEPS=${GPU_CHECK_SAC_STEPS:-12000}
PPO_STEPS=${GPU_CHECK_PPO_STEPS:-9600}
ENV_STEPS=${GPU_CHECK_ENV_STEPS:-200}
BUDGET=${GPU_CHECK_BUDGET:-330}
TAG=gpuchk$$
TMPD=$(mktemp -d)
LOG=$OUT/steps.log
: >"$LOG"
T0=$SECONDS
STEPS_TSV=$TMPD/steps.tsv
: >"$STEPS_TSV"

# step NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, what is left of BUDGET), output to $TMPD/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "== $name: skipped, the budget of ${BUDGET}s is spent" | tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$limit" >>"$STEPS_TSV"
    return
  fi
  echo "== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local start=$(date +%s%N)
  timeout -k 10 "$limit" "$@" >"$TMPD/$name.log" 2>&1
  local rc=$?
  local ms=$((($(date +%s%N) - start) / 1000000))
  local wall=$((ms / 1000)).$(printf %03d $((ms % 1000)))
  cat "$TMPD/$name.log" >>"$LOG"
  echo "== $name: exit $rc after ${wall}s" | tee -a "$LOG"
  tail -n 6 "$TMPD/$name.log" | sed 's/^/   | /'
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$wall" "$limit" >>"$STEPS_TSV"
}

step gpu_info 30 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else None)'"

step cpu_sim 60 "$PY" -c "
import sapien, torch, common
print(sapien.render.get_device_summary())
envs = common.make_env(2, 'physx_cpu', seed=0)
envs.reset(seed=0)
for _ in range(5):
    envs.step(torch.zeros(2, 7))
envs.close()
print('CPU_SIM_OK')"

step physx_cuda 60 "$PY" -c "
import torch, common
envs = common.make_env(512, 'physx_cuda', seed=0)
envs.reset(seed=0)
for _ in range(3):
    envs.step(torch.zeros(512, 7, device=envs.device))
envs.close()
print('PHYSX_CUDA_OK')"
PHYSX_OK=0
grep -q PHYSX_CUDA_OK "$TMPD/physx_cuda.log" && PHYSX_OK=1

COMMON=(--num-envs "$N" --sim-backend physx_cpu --num-eval-envs 2 --num-eval-episodes 2 --eval-freq 1000000000
  --no-save-model --cuda)
step sac 150 "$PY" sac_residual.py "${COMMON[@]}" --exp-name "${TAG}_sac" --total-timesteps "$SAC_STEPS" \
  --learning-starts 2000 --critic-warmup-updates 200 --progressive-steps 4000 --log-freq 2000
step ppo 120 "$PY" ppo_residual.py "${COMMON[@]}" --exp-name "${TAG}_ppo" --total-timesteps "$PPO_STEPS" \
  --num-steps 100
step env_steps 120 "$PY" benchmarks/env_overhead.py --num-envs "$N" --sim-backend physx_cpu --steps "$ENV_STEPS" \
  --rounds 1 --out "$TMPD/env_overhead.json"
if ((PHYSX_OK)); then
  step pytest_env 150 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_env.py
else  # the GPU-sim test would only repeat step 2's failure
  step pytest_env 150 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_env.py -k "not test_gpu_vector_env_steps"
fi

"$PY" - "$TMPD" "$TAG" "$OUT/gpu_check.json" "$N" "$NPROC" "$((SECONDS - T0))" <<'EOF'
import glob, json, os, re, sys

tmpd, tag, out, n, nproc, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])


def text(name):
    try:
        with open(os.path.join(tmpd, name + ".log"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


steps = {}
for line in open(os.path.join(tmpd, "steps.tsv")):
    name, rc, wall, limit = line.rstrip("\n").split("\t")
    steps[name] = dict(exit=None if rc == "skipped" else int(rc), wall_s=round(float(wall), 1), timeout_s=int(limit),
                       timed_out=rc in ("124", "137"))

res = dict(num_envs=n, cores=nproc, total_s=total, steps=steps)
info = text("gpu_info").splitlines()
res["nvidia_smi"] = [l for l in info if l.startswith("GPU ")]
m = [l for l in info if l.startswith("torch ")]
res["torch"] = m[0] if m else None
try:
    import torch
    res["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as err:  # noqa: BLE001
    res["gpu"] = f"error: {err}"

log = text("cpu_sim")
res["cpu_sim"] = dict(ok="CPU_SIM_OK" in log, render_devices=[l for l in log.splitlines() if l.startswith("GPU:")],
                      tail=log.splitlines()[-3:])
log = text("physx_cuda")
errs = [l for l in log.splitlines() if re.search(r"(Error|Exception|error:)", l)]
res["physx_cuda"] = dict(ok="PHYSX_CUDA_OK" in log, exit=steps.get("physx_cuda", {}).get("exit"),
                         error=errs[-1] if errs else None, tail=log.splitlines()[-5:])


def tb(prefix):
    runs = sorted(glob.glob(os.path.join("runs", prefix + "__*")))
    if not runs:
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(runs[-1], size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        want = ["charts/SPS", "charts/env_SPS", "charts/SPS_over_env_SPS", "time/update", "time/rollout", "time/env",
                "time/eval"]
        d = {k: round(acc.Scalars(k)[-1].value, 3) for k in want if k in tags}
        if "charts/SPS" in tags:
            ev = acc.Scalars("charts/SPS")
            d["last_step"] = ev[-1].step
            if len(ev) >= 2:  # steps/s between the first and the last log, by the logs' wall clock (no startup)
                d["window_sps"] = round((ev[-1].step - ev[0].step) / (ev[-1].wall_time - ev[0].wall_time), 1)
                d["window_steps"] = [ev[0].step, ev[-1].step]
        d["run_dir"] = runs[-1]
        return d
    except Exception as err:  # noqa: BLE001
        return {"tensorboard_error": str(err)}


for name in ("sac", "ppo"):
    log = text(name)
    sps = re.findall(r"^step (\d+)/\d+ \| SPS (\d+) \(([\d.]+) of env\)", log, re.M)
    r = dict(steps.get(name, {}), printed=[dict(step=int(s), sps=int(v), of_env=float(o)) for s, v, o in sps])
    r.update(tb(f"{tag}_{name}"))
    errs = [l for l in log.splitlines() if re.search(r"(Error|error:)", l)]
    if errs:
        r["error"] = errs[-1]
    res[name] = r

try:
    with open(os.path.join(tmpd, "env_overhead.json")) as f:
        res["env_steps"] = json.load(f)
except OSError:
    res["env_steps"] = None
lines = text("pytest_env").strip().splitlines()
res["pytest_env"] = dict(steps.get("pytest_env", {}), summary=lines[-1] if lines else None)
with open(out, "w") as f:
    json.dump(res, f, indent=2)

print(f"\n== gpu_check on {res['gpu']} ({nproc} cores, {n} CPU env workers), {total}s in all; {out}")
rows = [("CPU sim + render probe", ("ok; " if res["cpu_sim"]["ok"] else "FAILED; ") + ", ".join(res["cpu_sim"]["render_devices"])),
        ("physx_cuda (GPU sim)", "ok" if res["physx_cuda"]["ok"] else f"FAILED: {(res['physx_cuda']['error'] or '')[:90]}")]
for name in ("sac", "ppo"):
    r = res[name]
    if "charts/SPS" in r:
        rows.append((f"{name} CUDA learner, CPU sim",
                     f"SPS {r['charts/SPS']:.0f} at step {r.get('last_step')} (window {r.get('window_sps', 0):.0f}), "
                     f"env_SPS {r.get('charts/env_SPS', 0):.0f}, "
                     f"update {r.get('time/update', 0):.1f}s rollout {r.get('time/rollout', 0):.1f}s "
                     f"env {r.get('time/env', 0):.1f}s (exit {r.get('exit')}, {r.get('wall_s')}s)"))
    else:
        rows.append((f"{name} CUDA learner, CPU sim", f"no SPS (exit {r.get('exit')}, {r.get('error', '')})"))
e = res["env_steps"]
rows.append(("raw env steps/s, CPU sim", "n/a" if not e else
             f"raw_sparse {e['raw_sparse_sps']:.0f}, raw_dense {e['raw_dense_sps']:.0f}, "
             f"ours_staged {e['ours_staged_sps']:.0f}"))
rows.append(("tests/test_env.py", f"{res['pytest_env'].get('summary')} (exit {res['pytest_env'].get('exit')})"))
w = max(len(a) for a, _ in rows)
for a, b in rows:
    print(f"{a:<{w}}  {b}")
EOF
rm -rf "$TMPD" runs/"${TAG}"_*
