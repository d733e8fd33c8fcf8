"""Residual SAC's training throughput for a few network widths and update ratios, interleaved in one run.

Each configuration trains sac_residual.py for a short budget (2 CPU envs, the `coarse` base, no evaluation), round
after round, alternating, so that all of them see the same machine. Throughput is measured as the issue asks, as a
ratio within the run: training env steps/s over the simulator's own steps/s (the slowest worker's `env.step` time),
over a window that starts after the critic's warm-up, so it is the steady state with the residual acting and a
gradient update every 1 / utd env steps.

    python benchmarks/sac_throughput.py                       # 3 configs x 2 rounds of 8,000 env steps
    python benchmarks/sac_throughput.py --rounds 3 --configs "w256:--hidden-dim 256" "w128:--hidden-dim 128"
    git worktree add /tmp/old <commit>                        # against an older version of the script:
    python benchmarks/sac_throughput.py --configs "old@/tmp/old/sac_residual.py:" "new:"
    python benchmarks/sac_throughput.py --configs "ppo@ppo_residual.py:" --out benchmarks/results/ppo_throughput.json

Another script than sac_residual.py (e.g. ppo_residual.py, whose steps/s are logged once per 1,000-step rollout by
default) runs with only the shared flags; ms per update is then the update phase's time per env step.

Writes benchmarks/results/sac_throughput.json: per config and round, the window's training steps/s, simulator
steps/s, their ratio and ms per gradient update; and the median ratio per config.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import tyro
from curve import read_scalars  # benchmarks/ is on the path when this file runs as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    configs: list[str] = field(default_factory=lambda: [
        "w256_utd0.5:--hidden-dim 256 --utd 0.5", "w128_utd0.5:--hidden-dim 128 --utd 0.5",
        "w128_utd1:--hidden-dim 128 --utd 1.0"])
    """name:extra flags of sac_residual.py, one per configuration; name@path:flags runs the script at path instead
    (another version of sac_residual.py)"""
    rounds: int = 2
    """rounds; each runs every configuration once, in turn"""
    steps: int = 8_000
    """env steps per run"""
    window_start: int = 4_000
    """the window starts at this env step (after --learning-starts 2000, 100 warm-up updates and the progressive
    schedule's 2,000 steps)"""
    out: str = "benchmarks/results/sac_throughput.json"
    """the JSON to write"""


def measure(name, flags, args, workdir, k):
    name, _, script = name.partition("@")
    exp = f"throughput_{name}_{k}"
    script = os.path.abspath(script) if script else os.path.join(ROOT, "sac_residual.py")
    sac = os.path.basename(script) == "sac_residual.py"
    cmd = [sys.executable, script, "--exp-name", exp, "--seed", "1", "--num-envs", "2",
           "--total-timesteps", str(args.steps), "--eval-freq", str(10 * args.steps), "--num-eval-episodes", "2",
           "--no-save-model", *shlex.split(flags)]
    if sac:
        cmd += ["--learning-starts", "2000", "--critic-warmup-updates", "100", "--progressive-steps", "2000",
                "--log-freq", "1000"]
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    (run_dir,) = [os.path.join(workdir, "runs", d) for d in os.listdir(os.path.join(workdir, "runs"))
                  if d.startswith(exp + "__")]
    s = {tag: dict(read_scalars(run_dir, tag)) for tag in ("charts/SPS", "time/env", "time/update")}
    a, b = args.window_start, max(s["charts/SPS"])
    # charts/SPS and time/* are cumulative over the training time: difference them over the window
    t_a, t_b = a / s["charts/SPS"][a], b / s["charts/SPS"][b]  # training seconds since the first step (from 0)
    env_a, env_b = s["time/env"][a], s["time/env"][b]
    upd_a, upd_b = s["time/update"][a], s["time/update"][b]
    tokens = shlex.split(flags)
    utd = float(tokens[tokens.index("--utd") + 1]) if "--utd" in tokens else 0.5  # sac_residual.py's default
    sps, env_sps = (b - a) / (t_b - t_a), (b - a) / (env_b - env_a)
    out = dict(window=[a, b], sps=round(sps, 1), env_sps=round(env_sps, 1), ratio=round(sps / env_sps, 3))
    if sac:
        out["ms_per_update"] = round(1000 * (upd_b - upd_a) / ((b - a) * utd), 2)
    else:
        out["update_ms_per_env_step"] = round(1000 * (upd_b - upd_a) / (b - a), 3)
    return out


def git_commit(script):
    """The commit of the repository a script sits in, with '+' if its working tree differs (None outside git)."""
    folder = os.path.dirname(os.path.abspath(script)) if script else ROOT
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def main(args: Args):
    configs = [c.split(":", 1) for c in args.configs]
    results = {name.partition("@")[0]: [] for name, _ in configs}
    with tempfile.TemporaryDirectory() as workdir:
        for k in range(args.rounds):
            for name, flags in configs:
                r = measure(name, flags, args, workdir, k)
                results[name.partition("@")[0]].append(r)
                print(f"round {k} {name}: {r}", flush=True)
    out = dict(
        command="python benchmarks/sac_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        device=f"CPU, {os.cpu_count()} cores", steps=args.steps, window_start=args.window_start,
        configs={name: flags for name, flags in configs}, runs=results,
        commits={name.partition("@")[0]: git_commit(name.partition("@")[2]) for name, _ in configs},
        median_ratio={name: statistics.median(r["ratio"] for r in rs) for name, rs in results.items()})
    print(json.dumps(out["median_ratio"]))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(Args))
