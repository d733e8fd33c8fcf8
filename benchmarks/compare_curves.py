"""Compare settings by their mean learning curve over seeds, from the curve JSONs of benchmarks/curve.py.

Each setting's mean is taken over all its seeds, at the steps that every run of every setting evaluated; the seeds
themselves are drawn faintly. Prints a table of the means and writes <out>.json and <out>.png.

    python benchmarks/compare_curves.py --out benchmarks/results/sac_residual_gamma_compare \\
        --curves "gamma 0.95=benchmarks/results/sac_residual_lateral10.json" \\
                 "gamma 0.8=benchmarks/results/sac_residual_lateral10_gamma0.8.json"
"""

import json
import os
from dataclasses import dataclass, field

import tyro


@dataclass
class Args:
    curves: list[str] = field(default_factory=list)
    """label=path pairs: a curve JSON of benchmarks/curve.py per setting"""
    out: str = "benchmarks/results/compare_curves"
    """output prefix (.json, .png)"""
    target: float = 0.9
    """a success target to draw (0: none)"""
    seeds: list[int] = field(default_factory=list)
    """only these seeds, in every setting (default: each setting's own seeds), so that means compare like with like"""


def main(args: Args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = {}
    for item in args.curves:
        label, sep, path = item.partition("=")
        if not sep or not os.path.exists(path):
            raise SystemExit(f"error: --curves takes label=path pairs of existing files, got {item!r}")
        runs = [r for r in json.load(open(path))["runs"] if r["variant"] == "residual"
                and (not args.seeds or r["seed"] in args.seeds)]
        if args.seeds and sorted(r["seed"] for r in runs) != sorted(set(args.seeds)):
            raise SystemExit(f"error: {path} lacks some of --seeds {args.seeds}")
        settings[label] = {r["seed"]: dict(r["eval_success_at_end"]) for r in runs}
    steps = sorted(set.intersection(*(set(s) for runs in settings.values() for s in runs.values())))
    summary = dict(curves=args.curves, seeds=args.seeds or "all", steps=steps, settings={})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, runs) in enumerate(settings.items()):
        color = f"C{i}"
        for seed, curve in runs.items():
            ax.plot(sorted(curve), [curve[s] for s in sorted(curve)], "-", color=color, alpha=0.25, lw=1)
        means = [sum(c[s] for c in runs.values()) / len(runs) for s in steps]
        summary["settings"][label] = dict(seeds=sorted(runs), mean_success_at_end=means)
        ax.plot(steps, means, "o-", color=color, lw=2, label=f"{label}: mean of seeds {sorted(runs)}")
    if args.target:
        ax.axhline(args.target, color="green", ls=":", lw=1, label=f"target {args.target}")
    ax.set(xlabel="env steps", ylabel="eval success_at_end", ylim=(0, 1))
    ax.set_title("mean over seeds (faint: each seed); points at the steps every run has", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print("steps:", " ".join(f"{s // 1000}k" for s in steps))
    for label, s in summary["settings"].items():
        print(f"{label}: " + " ".join(f"{m:.3f}" for m in s["mean_success_at_end"]))


if __name__ == "__main__":
    main(tyro.cli(Args))
