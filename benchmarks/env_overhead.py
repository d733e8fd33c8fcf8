"""Env steps/s through common.make_env vs raw ManiSkill stepping: same env count, same run, interleaved rounds.

Raw: gymnasium's AsyncVectorEnv over ManiSkill's CPUGymWrapper (numpy actions, ManiSkill's own dense reward), or
ManiSkillVectorEnv on a GPU. Ours: make_env with the staged reward, torch tensors, episode metrics and final
observations. Both use the same control mode, observations and reconfiguration frequency.

    python benchmarks/env_overhead.py --num-envs 2 --steps 1000 --rounds 5
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


@dataclass
class Args:
    num_envs: int = 2
    """number of parallel envs (CPU: one process each)"""
    steps: int = 1000
    """vector steps per round and variant"""
    rounds: int = 5
    """interleaved rounds (raw, ours, raw, ours, ...); the ratio of total times is reported"""
    sim_backend: str = "auto"
    """auto, physx_cuda or physx_cpu"""
    out: str = "benchmarks/results/env_overhead.json"
    """where to write the JSON result ('' to skip)"""


def _raw_cpu_worker():
    import gymnasium as gym
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    torch.set_num_threads(1)
    env = gym.make(common.ENV_ID, obs_mode="state", control_mode="pd_ee_delta_pose", sim_backend="physx_cpu",
                   reconfiguration_freq=10, enhanced_determinism=True)
    return CPUGymWrapper(env)


def make_raw(backend, num_envs):
    import gymnasium as gym

    if backend == "physx_cuda":
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        env = gym.make(common.ENV_ID, num_envs=num_envs, obs_mode="state", control_mode="pd_ee_delta_pose",
                       sim_backend="physx_cuda")
        return ManiSkillVectorEnv(env, num_envs, auto_reset=True)
    return gym.vector.AsyncVectorEnv([_raw_cpu_worker] * num_envs, context="spawn",
                                     autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def main(args: Args):
    backend = common.resolve_sim_backend(args.sim_backend)
    raw = make_raw(backend, args.num_envs)
    ours = common.make_env(args.num_envs, backend, seed=0)
    raw.reset(seed=0), ours.reset()
    gen = torch.Generator().manual_seed(0)
    actions = (torch.rand(args.steps, args.num_envs, 7, generator=gen) * 2 - 1).to(ours.device)
    raw_actions = actions if backend == "physx_cuda" else actions.cpu().numpy()
    sync = torch.cuda.synchronize if backend == "physx_cuda" else (lambda: None)
    times = {"raw": 0.0, "ours": 0.0}
    for _ in range(args.rounds):
        for name, env, acts in (("raw", raw, raw_actions), ("ours", ours, actions)):
            sync()
            start = time.perf_counter()
            for t in range(args.steps):
                env.step(acts[t])
            sync()
            times[name] += time.perf_counter() - start
    raw.close(), ours.close()
    n = args.rounds * args.steps * args.num_envs
    result = dict(
        sim_backend=backend,
        num_envs=args.num_envs,
        env_steps_per_variant=n,
        raw_sps=n / times["raw"],
        factory_sps=n / times["ours"],
        factory_over_raw=times["raw"] / times["ours"],
        overhead=times["ours"] / times["raw"] - 1,
        device=torch.cuda.get_device_name() if backend == "physx_cuda" else f"CPU, {os.cpu_count()} cores",
    )
    print(json.dumps(result))
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    common.exit_on_config_error(lambda: main(tyro.cli(Args)))
