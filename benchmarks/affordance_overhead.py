"""Training throughput of affordance_ppo.py as a ratio of ppo_residual.py's, measured in one run.

Runs both scripts with the same flags for the same number of env steps, alternating (A B A B ...) so machine noise
hits both alike, and compares their charts/SPS (training steps per second, evaluation excluded). The affordance
script renders one camera frame per episode (at reset) and re-projects the map every step.

    python benchmarks/affordance_overhead.py                       # CPU: 2 envs, 2 rounds of 5000 steps each
    python benchmarks/affordance_overhead.py --rounds 3 -- --affordance clipseg:CIDAS/clipseg-rd64-refined

Writes benchmarks/results/affordance_overhead.json (extra flags after -- go to affordance_ppo.py only).
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from curve import read_scalars  # noqa: E402


@dataclass
class Args:
    steps: int = 5000
    """env steps per run"""
    rounds: int = 2
    """runs per script, alternating"""
    num_envs: int = 2
    """training envs"""
    out: str = os.path.join("benchmarks", "results", "affordance_overhead.json")
    """where the JSON goes"""
    device: str = "CPU, 2 cores"
    """the machine, in words (name the GPU)"""


def sps(script, args, workdir, name, extra):
    cmd = [sys.executable, os.path.join(ROOT, script), "--exp-name", name, "--total-timesteps", str(args.steps),
           "--num-envs", str(args.num_envs), "--eval-freq", str(10 * args.steps), "--num-eval-episodes", "2",
           "--no-save-model", *extra]
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    (run_dir,) = [os.path.join(workdir, "runs", d) for d in os.listdir(os.path.join(workdir, "runs"))
                  if d.startswith(name + "__")]
    return read_scalars(run_dir, "charts/SPS")[-1][1], read_scalars(run_dir, "charts/env_SPS")[-1][1]


def main(args: Args, extra: list[str]):
    results = {"ppo_residual.py": [], "affordance_ppo.py": []}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            for script in results:
                s, env_s = sps(script, args, workdir, f"{script[:-3]}_{r}", extra if script[0] == "a" else [])
                results[script].append(dict(sps=s, env_sps=env_s))
                print(f"{script}: {s:.1f} steps/s (simulator {env_s:.1f})", flush=True)
    mean = {k: sum(x["sps"] for x in v) / len(v) for k, v in results.items()}
    out = dict(device=args.device, steps=args.steps, rounds=args.rounds, num_envs=args.num_envs, extra=extra,
               command="python benchmarks/affordance_overhead.py " + " ".join(sys.argv[1:]), runs=results,
               mean_sps=mean, ratio=mean["affordance_ppo.py"] / mean["ppo_residual.py"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"affordance_ppo.py / ppo_residual.py training steps/s: {out['ratio']:.2f} -> {args.out}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    main(tyro.cli(Args, args=argv[: argv.index("--")] if "--" in argv else argv), extra)
