"""What a hand-written residual achieves on top of a base: a ceiling for the learned ones, and a check that the
task leaves a residual of bounded size (--residual-scale) something to fix.

    python benchmarks/oracle_residual.py --residual lateral --num-episodes 100 --seed 0

Residuals (all deterministic, in [-1, 1], composed as a = clip(a_base + scale * a_res) like the learned ones):
- none: the base alone.
- lateral: a proportional controller on the head's lateral offset from the true hole axis (common.task_features),
  active once the head is within 6 cm of the box face: a_res = gain * e_lat / (0.1 m * track_frac) / scale.
- expert: imitate the privileged expert within the bound: a_res = clip((a_expert - a_base) / scale).
Writes benchmarks/results/oracle_residual_<residual>.json (change with --out, 'none' to skip).
"""

import json
import os
import sys
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


@dataclass
class Args:
    residual: str = "lateral"
    """none, lateral or expert"""
    base: str = "coarse"
    """the frozen base: expert, coarse[:key=value,...] or zero"""
    residual_scale: float = 0.1
    """bound of the residual in action units (the learning scripts' default)"""
    gain: float = 1.0
    """lateral: fraction of the offset corrected per step"""
    num_episodes: int = 100
    seed: int = 0
    out: str = ""
    """JSON output path ('': benchmarks/results/oracle_residual_<residual>.json; 'none' to skip)"""


def main(args: Args):
    if args.residual not in ("none", "lateral", "expert"):
        raise common.ConfigError(f"--residual must be none, lateral or expert, got {args.residual!r}")
    if args.residual_scale <= 0 or args.num_episodes < 1:
        raise common.ConfigError("--residual-scale must be > 0 and --num-episodes >= 1")
    envs = common.make_env(2, "physx_cpu", eval_mode=True, seed=args.seed)
    try:
        base = common.make_base_policy(args.base, envs, seed=args.seed)
        expert = common.ExpertBase(envs.num_envs, envs.device)
        track_frac = common.CoarseBase.Config().track_frac

        def lateral(obs, a_base):
            f = common.task_features(obs["state"])
            e_lat, near = f[:, :3] / 100, f[:, 3:4] > -6.0  # m; head within 6 cm of the face
            a_res = torch.zeros_like(a_base)
            a_res[:, :3] = torch.where(near, args.gain * e_lat / (0.1 * track_frac) / args.residual_scale, 0.0)
            return a_res.clamp(-1, 1)

        def imitate(obs, a_base):
            return ((expert(obs) - a_base) / args.residual_scale).clamp(-1, 1)

        if args.residual == "expert":  # the expert's integrator is cleared with the base's episodes
            base_reset = base.reset
            base.reset = lambda mask, seed=None: (base_reset(mask, seed), expert.reset(mask))
        residual = dict(none=None, lateral=lateral, expert=imitate)[args.residual]
        stats = common.evaluate(envs, base, args.num_episodes, residual, args.residual_scale, seed=args.seed)
    finally:
        envs.close()
    result = dict(vars(args), success_once=stats["success_once"], success_at_end=stats["success_at_end"],
                  mean_return=stats["return"], device=f"CPU, {os.cpu_count()} cores",
                  command="python " + " ".join(sys.argv))
    print(json.dumps(result))
    out = args.out or f"benchmarks/results/oracle_residual_{args.residual}.json"
    if out != "none":
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    common.exit_on_config_error(lambda: main(tyro.cli(Args)))
