"""affordance_ppo.py against the same PPO without the affordance term, from the curve JSONs of benchmarks/curve.py.

Two settings: the `coarse` base (it grasps the tail by design) against ppo_residual.py's curve, and a base that takes
the peg by its middle (`coarse:grasp_frac=0,grasp_off=-1`) with `--affordance tail` against `--affordance none` (the
same script, so the grasps are measured in both). Plots eval success_at_end and the share of grasps on the tail.

    python benchmarks/affordance_compare.py          # reads benchmarks/results/*.json, writes affordance_compare.png

The runs themselves (CPU, one seed each, 100 eval episodes per point):
    python benchmarks/curve.py --script ppo_residual.py --variants residual --total-timesteps 300000 \\
        --eval-freq 50000 --num-eval-episodes 100 --target 0.8
    python benchmarks/curve.py --script affordance_ppo.py --variants residual --total-timesteps 100000 \\
        --eval-freq 50000 --num-eval-episodes 100 [--run-prefix coarse_none_ \\
        --out benchmarks/results/affordance_ppo_coarse_none -- --affordance none]
    python benchmarks/curve.py --script affordance_ppo.py --base "coarse:grasp_frac=0,grasp_off=-1" \\
        --variants residual --total-timesteps 100000 --eval-freq 50000 --num-eval-episodes 100 \\
        --run-prefix midgrasp_<tail|none>_ --out benchmarks/results/affordance_ppo_midgrasp_<tail|none> \\
        [-- --affordance none]
    python benchmarks/curve.py --script affordance_ppo.py --base "coarse:grasp_frac=0,grasp_off=-1" \\
        --variants residual --total-timesteps 100000 --eval-freq 50000 --num-eval-episodes 100 \\
        --run-prefix midgrasp_tail_scale0.3_ --out benchmarks/results/affordance_ppo_midgrasp_tail_scale0.3 \\
        -- --residual-scale 0.3 --init-std 0.1
"""

import json
import os
from dataclasses import dataclass

import tyro

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CURVES = [  # (label, file, colour, line style)
    ("PPO, coarse base (no affordance term)", "ppo_residual_curve.json", "tab:gray", "-"),
    ("affordance PPO, coarse base", "affordance_ppo_curve.json", "tab:blue", "-"),
    ("affordance_ppo.py --affordance none, coarse base", "affordance_ppo_coarse_none.json", "tab:purple", "-."),
    ("PPO, middle-grasping base, --affordance none", "affordance_ppo_midgrasp_none.json", "tab:orange", "--"),
    ("affordance PPO, middle-grasping base", "affordance_ppo_midgrasp_tail.json", "tab:green", "--"),
    ("affordance PPO, middle-grasping base, --residual-scale 0.3", "affordance_ppo_midgrasp_tail_scale0.3.json",
     "tab:olive", ":"),
]


@dataclass
class Args:
    out: str = os.path.join(RESULTS, "affordance_compare.png")
    """where the plot goes"""


def main(args: Args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, name, colour, style in CURVES:
        path = os.path.join(RESULTS, name)
        if not os.path.exists(path):
            print(f"missing {path}: skipped")
            continue
        (run,) = [r for r in json.load(open(path))["runs"] if r["variant"] == "residual"]
        for ax, key in ((ax1, "eval_success_at_end"), (ax2, "eval_grasp_tail_frac")):
            if run.get(key):
                steps, values = zip(*run[key])
                ax.plot(steps, values, "o" + style, color=colour, label=label)
    ax1.set_ylabel("eval success_at_end")
    ax2.set_ylabel("eval: share of first grasps on the tail half")
    for ax in (ax1, ax2):
        ax.set_xlabel("env steps")
        ax.set_ylim(-0.02, 1.02)
    ax2.axhline(0.95, color="green", ls=":", lw=1, label="target 0.95")
    ax1.legend(fontsize=7, loc="upper right")
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle("Affordance reward on PegInsertionSide-v1: CPU, 2 envs, 1 seed per curve, 100 eval episodes per point",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
