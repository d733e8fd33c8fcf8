"""Issue 6's benchmark: learning a search strategy from a few demonstrations, on the hidden-hole variant.

At equal env steps, one seed per variant unless --seeds says more:
  demos<N>     demo_explore_sac.py with N demonstrations (default 1, 3, 10). Its first evaluation (step 0) comes
               right after its behaviour-cloning start and before any env step: that point IS behaviour cloning on
               the N demonstrations alone, with the same updates and seed as `bc<N>` would run
  sac          sac_residual.py on the same env and base, no demonstrations
  bc<N>        behaviour cloning alone as a run of its own (demo_explore_sac.py --total-timesteps 0), optional
  <v>_dart<s>  demos<N> or bc<N> with --demo-noise s (DART), e.g. demos10_dart0.05; without the suffix the script's
               default applies (0.05 now; runs before 2026-11-26 used clean demonstrations: _dart0)
  base         the base alone (logged by every run as eval_base/)
Each run is a subprocess writing tensorboard logs under --workdir; eval/success_at_end, eval/success_once and
eval/median_steps_to_success are read back into <out>.json and plotted into <out>.png. Runs are keyed by variant and
seed, so a rerun replaces its own entry and separate processes can fill one file.

    python benchmarks/demo_explore.py                                      # CPU, 2 envs, 30k steps per RL run
    python benchmarks/demo_explore.py --variants demos10 --extra "--policy-lr 1e-4" --tag lr1e-4    # other flags
    python benchmarks/demo_explore.py --variants demos10 sac --total-timesteps 200_000 --num-envs 512  # GPU
"""

import glob
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from curve import merge, read_scalars  # noqa: E402


@dataclass
class Args:
    variants: list[str] = field(default_factory=lambda: ["demos10", "sac", "demos3", "demos1"])
    """demos<N>, sac, bc<N> (see the module docstring)"""
    base: str = "expert"
    """the base (aims at the hole estimate)"""
    total_timesteps: int = 30_000
    """env steps per RL run (the benchmark's budget flag)"""
    eval_freq: int = 10_000
    """evaluate every this many env steps"""
    num_eval_episodes: int = 50
    """episodes per evaluation"""
    num_envs: int = 2
    """training envs"""
    bc_updates: int = 5_000
    """gradient steps of the BC-alone variants (and of the BC start of the demos variants)"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """one run per seed and variant"""
    out: str = "benchmarks/results/demo_explore"
    """output prefix (.json, .png)"""
    workdir: str = "benchmarks/runs"
    """where the runs' logs, checkpoints and the cached demonstrations go"""
    device: str = "CPU, 2 cores"
    """the machine, in words, recorded with each run (name the GPU)"""
    extra: str = ""
    """further flags for every demo_explore_sac.py run (recorded in its command) ..."""
    tag: str = ""
    """... and a tag that keeps those runs apart: variant `<variant>+<tag>` in the JSON"""
    collect_only: bool = False
    """read runs already in --workdir (named as this benchmark names them) instead of running them; CPU runs are
    deterministic, so the recorded command reproduces their numbers"""


def command(args: Args, variant: str, seed: int, name: str) -> list[str]:
    common_flags = ["--exp-name", name, "--seed", str(seed), "--base", args.base, "--num-envs", str(args.num_envs),
                    "--num-eval-episodes", str(args.num_eval_episodes), "--eval-freq", str(args.eval_freq)]
    if variant == "sac":
        return [os.path.join(ROOT, "sac_residual.py"), "--env-id", "PegInsertionSideHidden-v1",
                "--total-timesteps", str(args.total_timesteps), *common_flags]
    core, _, noise = variant.partition("_dart")
    kind, n = core.rstrip("0123456789"), core[len(core.rstrip("0123456789")):]
    if kind not in ("demos", "bc") or not n or (variant != core and not noise):
        raise SystemExit(f"error: unknown variant {variant!r}: demos<N>, sac or bc<N>, optionally with _dart<noise>")
    steps = args.total_timesteps if kind == "demos" else 0
    return [os.path.join(ROOT, "demo_explore_sac.py"), "--num-demos", n, "--bc-pretrain-updates",
            str(args.bc_updates), "--total-timesteps", str(steps), *(["--demo-noise", noise] if noise else []),
            *common_flags, *shlex.split(args.extra)]


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw=dict(width_ratios=[2, 1]))
    runs = sorted(results["runs"], key=lambda r: (r["variant"], r["seed"]))
    for r in runs:
        if not r["variant"].startswith("bc") and r["eval_success_at_end"]:
            steps, values = zip(*r["eval_success_at_end"])
            ax.plot(steps, values, "o-", label=f"{r['variant']} (seed {r['seed']})")
    base = [r["base_alone_success_at_end"][0][1] for r in runs if r["base_alone_success_at_end"]]
    if base:
        ax.axhline(sum(base) / len(base), color="gray", ls="--", label=f"{runs[0]['base']} base alone")
    ax.axhline(0.8, color="green", ls=":", lw=1, label="target 0.8")
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval success_at_end")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"PegInsertionSideHidden-v1, {runs[0]['num_eval_episodes']} eval episodes per point, "
                 f"{runs[0]['device']} (step 0 of a demos run: BC alone)", fontsize=8)
    # success by number of demonstrations (mean over seeds): RL with demos (last eval) vs BC alone (its step 0)
    by_n = {}
    for r in runs:
        m = re.fullmatch(r"demos(\d+)(_dart[\d.]+)?", r["variant"])
        if m and r["eval_success_at_end"]:
            by_n.setdefault(int(m[1]), []).append(r["eval_success_at_end"])
    def at_20k(curve):
        return dict(curve).get(20_000)

    for label, marker, pick in (("RL + demos, last eval", "o-", lambda c: c[-1][1]),
                                ("RL + demos, 20k steps (the script's default budget)", "^-", at_20k),
                                ("BC alone (step 0)", "s--", lambda c: c[0][1])):
        pts = sorted((n, sum(map(pick, cs)) / len(cs)) for n, cs in by_n.items() if all(pick(c) is not None for c in cs))
        if pts:
            ax2.plot(*zip(*pts), marker, label=label)
    for n, cs in by_n.items():
        ax2.annotate(f"{len(cs)} seed{'s' if len(cs) > 1 else ''}", (n, sum(c[-1][1] for c in cs) / len(cs)),
                     textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xticks([1, 3, 10], ["1", "3", "10"])
    ax2.set_xlabel("demonstrations")
    ax2.set_ylabel("eval success_at_end, mean over seeds")
    ax2.set_ylim(-0.02, 1.02)
    if by_n:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    plt.close(fig)


def main(args: Args):
    os.makedirs(args.workdir, exist_ok=True)
    for variant in args.variants:
        for seed in args.seeds:
            key = f"{variant}+{args.tag}" if args.tag else variant
            name = f"demo_explore_{key}_s{seed}"
            cmd = command(args, variant, seed, name)
            start = time.time()
            if not args.collect_only:
                print("running:", " ".join(cmd), flush=True)
                subprocess.run([sys.executable, *cmd], cwd=args.workdir, check=True)
            run_dir = sorted(glob.glob(os.path.join(args.workdir, "runs", name + "__*")))[-1]
            sps = read_scalars(run_dir, "charts/SPS")
            ratio = read_scalars(run_dir, "charts/SPS_over_env_SPS")
            results = merge(args.out + ".json", dict(
                variant=key, seed=seed, base=args.base, command=shlex.join(["python"] + cmd).replace(ROOT + "/", ""),
                device=args.device, num_envs=args.num_envs, num_eval_episodes=args.num_eval_episodes,
                total_timesteps=args.total_timesteps, wall_s=None if args.collect_only else time.time() - start,
                eval_success_at_end=read_scalars(run_dir, "eval/success_at_end"),
                eval_success_once=read_scalars(run_dir, "eval/success_once"),
                eval_median_steps_to_success=read_scalars(run_dir, "eval/median_steps_to_success"),
                base_alone_success_at_end=read_scalars(run_dir, "eval_base/success_at_end")[:1],
                final_sps=sps[-1][1] if sps else None, final_sps_over_env_sps=ratio[-1][1] if ratio else None,
            ))
            plot(results, args.out)


if __name__ == "__main__":
    main(tyro.cli(Args))
