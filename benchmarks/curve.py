"""Learning curves of a residual script: the residual on a base vs the base alone vs the same algorithm from scratch.

Runs the script once per (variant, seed) as a subprocess, reads eval/success_at_end (and the base-alone line,
eval_base/) and the throughput ratio from its tensorboard logs, and merges them into <out>.json and <out>.png
(default benchmarks/results/<script>_curve). Runs are keyed by (variant, seed), so two processes can fill one file
(e.g. --variants residual and --variants scratch side by side) and a rerun replaces its own entry.

    python benchmarks/curve.py --script sac_residual.py                   # CPU: 2 envs, 200k steps, evals every 25k
    python benchmarks/curve.py --script ppo_residual.py --total-timesteps 500_000 --eval-freq 100_000 \\
        --num-eval-episodes 100
    python benchmarks/curve.py --script sac_residual.py --total-timesteps 1_000_000 --num-envs 512 --seeds 1 2 3
Extra flags for the script go after --: python benchmarks/curve.py --script sac_residual.py -- --utd 0.25
"""

import fcntl
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
    script: str = "sac_residual.py"
    """the residual script to benchmark"""
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
    out: str = ""
    """output prefix (.json, .png); default benchmarks/results/<script>_curve"""
    workdir: str = "benchmarks/runs"
    """where the runs' tensorboard logs and checkpoints go"""
    device: str = "CPU, 2 cores"
    """the machine, in words, recorded with each run (name the GPU)"""
    target: float = 0.0
    """a success target to draw as a line (0: none)"""
    collect_only: bool = False
    """whether to only read the newest finished run of each (variant, seed) from workdir, without running anything"""
    run_prefix: str = ""
    """with --collect-only: the run-name prefix to read instead of curve_<script>_ (runs from an older harness)"""


def read_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def merge(path, run):
    """Add (or replace) one run in the results file, under a lock."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.load(open(path)) if os.path.exists(path) else dict(runs=[])
        results["runs"] = [r for r in results["runs"] if (r["variant"], r["seed"]) != (run["variant"], run["seed"])]
        results["runs"].append(run)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        return results


def main(args: Args, extra: list[str]):
    out = args.out or os.path.join("benchmarks", "results", os.path.splitext(args.script)[0] + "_curve")
    os.makedirs(args.workdir, exist_ok=True)
    for variant in args.variants:
        for seed in args.seeds:
            base = args.base if variant == "residual" else "zero"
            name = f"{args.run_prefix or 'curve_' + os.path.splitext(args.script)[0] + '_'}{variant}_{base}_s{seed}"
            cmd = [sys.executable, os.path.join(ROOT, args.script), "--exp-name", name, "--seed", str(seed),
                   "--base", base, "--total-timesteps", str(args.total_timesteps), "--eval-freq", str(args.eval_freq),
                   "--num-eval-episodes", str(args.num_eval_episodes), "--num-envs", str(args.num_envs), *extra]
            start = time.time()
            if not args.collect_only:
                print("running:", " ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, cwd=args.workdir, check=True)
            found = sorted(glob.glob(os.path.join(args.workdir, "runs", name + "__*")))
            if not found:
                raise SystemExit(f"error: no run {name}__* under {os.path.join(args.workdir, 'runs')}")
            run_dir = found[-1]
            sps = read_scalars(run_dir, "charts/SPS")
            ratio = read_scalars(run_dir, "charts/SPS_over_env_SPS")
            results = merge(out + ".json", dict(
                script=args.script, variant=variant, seed=seed, base=base, command=" ".join(cmd[1:]),
                device=args.device, num_envs=args.num_envs, num_eval_episodes=args.num_eval_episodes,
                wall_s=None if args.collect_only else time.time() - start,
                eval_success_at_end=read_scalars(run_dir, "eval/success_at_end"),
                eval_success_once=read_scalars(run_dir, "eval/success_once"),
                base_alone_success_at_end=read_scalars(run_dir, "eval_base/success_at_end")[:1],
                final_sps=sps[-1][1] if sps else None,
                final_env_sps=(read_scalars(run_dir, "charts/env_SPS") or [(0, None)])[-1][1],
                final_sps_over_env_sps=ratio[-1][1] if ratio else None,
                # evaluation time up to the last SPS log (older runs counted it in their SPS)
                eval_s=sum(v for s, v in read_scalars(run_dir, "time/eval") if sps and s < sps[-1][0]),
                # the actor itself where eval/ is its Polyak average (sac_residual.py --eval-ema); where the gripper
                # grasps the peg (affordance_ppo.py); empty for the other scripts
                **{key.replace("/", "_"): read_scalars(run_dir, key) for key in (
                    "eval_raw/success_at_end", "eval/grasp_tail_frac", "eval/grasp_rate", "eval_base/grasp_tail_frac",
                    "train/grasp_tail_frac", "reward/affordance")},
            ))
            plot(results, out, args.target)


def plot(results, out, target=0.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"residual": "tab:blue", "scratch": "tab:red"}
    runs = sorted(results["runs"], key=lambda r: (r["variant"], r["seed"]))
    algo = runs[0]["script"].split("_")[0].upper()
    for run in runs:
        steps, values = zip(*run["eval_success_at_end"]) if run["eval_success_at_end"] else ([], [])
        label = f"residual {algo} on {run['base']}" if run["variant"] == "residual" else f"{algo} from scratch (base zero)"
        style = ("o-", "s--", "^:", "d-.")[sorted(r["seed"] for r in runs if r["variant"] == run["variant"]).index(
            run["seed"]) % 4]
        if run.get("eval_raw_success_at_end"):
            label += " (its averaged actor, --eval-ema)"
        ax.plot(steps, values, style, color=colors[run["variant"]], label=f"{label}, seed {run['seed']}")
        if run.get("eval_raw_success_at_end"):  # --eval-ema: eval/ is the averaged actor, this the actor itself
            raw_steps, raw_values = zip(*run["eval_raw_success_at_end"])
            ax.plot(raw_steps, raw_values, style, color=colors[run["variant"]], alpha=0.35, lw=1,
                    label=f"the same run's actor itself (not averaged), seed {run['seed']}")
    base_lines = [r["base_alone_success_at_end"][0][1] for r in runs if r["variant"] == "residual"
                  and r["base_alone_success_at_end"]]
    if base_lines:
        base = next(r["base"] for r in runs if r["variant"] == "residual")
        ax.axhline(sum(base_lines) / len(base_lines), color="gray", ls="--", label=f"{base} base alone")
    if target:
        ax.axhline(target, color="green", ls=":", lw=1, label=f"target {target}")
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval success_at_end")
    ax.set_ylim(-0.02, 1.02)
    seeds = ", ".join(f"{v}: {sum(r['variant'] == v for r in runs)}" for v in sorted({r["variant"] for r in runs}))
    ax.set_title(f"{runs[0]['script']} on PegInsertionSide-v1: seeds per variant ({seeds}), "
                 f"{runs[0]['num_eval_episodes']} eval episodes per point, {runs[0]['num_envs']} envs, "
                 f"{runs[0]['device']}", fontsize=7)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    main(tyro.cli(Args, args=argv[: argv.index("--")] if "--" in argv else argv), extra)
