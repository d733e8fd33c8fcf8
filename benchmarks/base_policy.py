"""Evaluate a frozen base policy alone on ManiSkill's protocol and print one JSON line.

    python benchmarks/base_policy.py --base coarse --num-episodes 200 --seed 0
    python benchmarks/base_policy.py --base expert --env-id PegInsertionSideHidden-v1 --num-episodes 100

Writes the same JSON to benchmarks/results/base_policy_<base>[_<env id>].json (change with --out, 'none' to skip).
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


@dataclass
class Args:
    base: str = "coarse"
    """the frozen base: pi0:<hub id or folder>, expert, coarse[:key=value,...] or zero"""
    env_id: str = common.ENV_ID
    """the task: PegInsertionSide-v1, or PegInsertionSideHidden-v1 (the hole behind a panel, a noisy estimate)"""
    num_episodes: int = 200
    """episodes to evaluate (full length, ManiSkill's eval protocol)"""
    seed: int = 0
    """seed of the eval envs (env i starts from seed + i) and of the base"""
    sim_backend: str = "auto"
    """auto, physx_cuda or physx_cpu"""
    num_envs: int = 0
    """parallel eval envs (0: 2 on CPU, 100 on a GPU)"""
    out: str = ""
    """JSON output path ('' : benchmarks/results/base_policy_<base>.json; 'none' to skip)"""


def main(args: Args):
    if args.num_episodes < 1:
        raise common.ConfigError(f"--num-episodes must be >= 1, got {args.num_episodes}")
    backend = common.resolve_sim_backend(args.sim_backend)
    num_envs = args.num_envs or (100 if backend == "physx_cuda" else 2)
    envs = common.make_env(num_envs, backend, env_id=args.env_id, eval_mode=True, seed=args.seed,
                           images=common.base_needs_images(args.base))
    try:
        base = common.make_base_policy(args.base, envs, seed=args.seed)
        start = time.perf_counter()
        stats = common.evaluate(envs, base, args.num_episodes, seed=args.seed)
        wall = time.perf_counter() - start
    finally:
        envs.close()
    episodes_run = -(-args.num_episodes // num_envs) * num_envs
    result = dict(
        base=args.base,
        env_id=args.env_id,
        num_episodes=args.num_episodes,
        seed=args.seed,
        sim_backend=backend,
        num_envs=num_envs,
        success_once=stats["success_once"],
        success_at_end=stats["success_at_end"],
        mean_return=stats["return"],
        mean_episode_len=stats["episode_len"],
        sps=episodes_run * envs.max_episode_steps / wall,
        wall_s=wall,
        device=torch.cuda.get_device_name() if backend == "physx_cuda" else f"CPU, {os.cpu_count()} cores",
    )
    print(json.dumps(result))
    suffix = "" if args.env_id == common.ENV_ID else f"_{args.env_id}"
    out = args.out or f"benchmarks/results/base_policy_{args.base.split(':')[0]}{suffix}.json"
    if out != "none":
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    common.exit_on_config_error(lambda: main(tyro.cli(Args)))
