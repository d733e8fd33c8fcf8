"""Learning curves of sac_residual.py: residual SAC on a base vs the base alone vs SAC from scratch (--base zero).

Runs sac_residual.py once per (variant, seed) as a subprocess, reads eval/success_at_end (and the base-alone line,
eval_base/) from its tensorboard logs, and writes benchmarks/results/sac_curve.json and sac_curve.png.

    python benchmarks/sac_curve.py                                        # CPU: 2 envs, 200k steps, 1 seed
    python benchmarks/sac_curve.py --total-timesteps 1_000_000 --num-envs 512 --seeds 1 2 3   # a bigger GPU run
Extra flags for sac_residual.py go after --: python benchmarks/sac_curve.py -- --utd 0.25
"""

import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    base: str = "coarse"
    """the base the residual learns on"""
    total_timesteps: int = 200_000
    """the budget per run (the benchmark's budget flag)"""
    eval_freq: int = 25_000
    """evaluate every this many env steps"""
    num_eval_episodes: int = 50
    """episodes per evaluation"""
    num_envs: int = 2
    """training envs"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """one run per seed and variant"""
    variants: list[str] = field(default_factory=lambda: ["residual", "scratch"])
    """residual (on --base) and/or scratch (--base zero); the base alone comes with every run (eval_base/)"""
    out: str = "benchmarks/results/sac_curve"
    """output prefix (.json, .png)"""
    workdir: str = "benchmarks/runs"
    """where the runs' tensorboard logs and checkpoints go"""


def read_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def main(args: Args, extra: list[str]):
    os.makedirs(args.workdir, exist_ok=True)
    results = dict(args=vars(args), extra_flags=extra, runs=[])
    for variant in args.variants:
        for seed in args.seeds:
            name = f"curve_{variant}_{args.base if variant == 'residual' else 'zero'}_s{seed}"
            cmd = [sys.executable, os.path.join(ROOT, "sac_residual.py"), "--exp-name", name, "--seed", str(seed),
                   "--base", args.base if variant == "residual" else "zero", "--total-timesteps",
                   str(args.total_timesteps), "--eval-freq", str(args.eval_freq), "--num-eval-episodes",
                   str(args.num_eval_episodes), "--num-envs", str(args.num_envs), *extra]
            print("running:", " ".join(cmd[1:]), flush=True)
            start = time.time()
            subprocess.run(cmd, cwd=args.workdir, check=True)
            run_dir = sorted(glob.glob(os.path.join(args.workdir, "runs", name + "__*")))[-1]
            sps = read_scalars(run_dir, "charts/SPS")
            ratio = read_scalars(run_dir, "charts/SPS_over_env_SPS")
            results["runs"].append(dict(
                variant=variant, seed=seed, base=args.base if variant == "residual" else "zero",
                wall_s=time.time() - start,
                eval_success_at_end=read_scalars(run_dir, "eval/success_at_end"),
                eval_success_once=read_scalars(run_dir, "eval/success_once"),
                base_alone_success_at_end=read_scalars(run_dir, "eval_base/success_at_end")[:1],
                final_sps=sps[-1][1] if sps else None,
                final_sps_over_env_sps=ratio[-1][1] if ratio else None,
            ))
            with open(args.out + ".json", "w") as f:
                json.dump(results, f, indent=2)
    plot(results, args)


def plot(results, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"residual": "tab:blue", "scratch": "tab:red"}
    base_lines = []
    for run in results["runs"]:
        steps, values = zip(*run["eval_success_at_end"]) if run["eval_success_at_end"] else ([], [])
        label = f"residual SAC on {run['base']}" if run["variant"] == "residual" else "SAC from scratch (base zero)"
        ax.plot(steps, values, "o-", color=colors[run["variant"]], label=f"{label}, seed {run['seed']}")
        if run["variant"] == "residual" and run["base_alone_success_at_end"]:
            base_lines.append(run["base_alone_success_at_end"][0][1])
    if base_lines:
        ax.axhline(sum(base_lines) / len(base_lines), color="gray", ls="--", label=f"{args.base} base alone")
    ax.axhline(0.9, color="green", ls=":", lw=1, label="target 0.9")
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval success_at_end")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"PegInsertionSide-v1, {len(args.seeds)} seed(s), {args.num_eval_episodes} eval episodes per point, "
                 f"{args.num_envs} envs", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    main(tyro.cli(Args, args=argv[: argv.index("--")] if "--" in argv else argv), extra)
