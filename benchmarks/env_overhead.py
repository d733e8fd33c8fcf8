"""Env steps/s through common.make_env vs raw ManiSkill stepping: same env count, one run, interleaved rounds.

Variants, all with the same control mode, state observations and reconfiguration frequency:
- raw_sparse: gymnasium's AsyncVectorEnv over ManiSkill's CPUGymWrapper (ManiSkillVectorEnv on a GPU), ManiSkill's
  cheapest reward (sparse): the stepping cost of the simulator itself;
- raw_dense: the same with ManiSkill's default reward (normalized_dense), for reference;
- ours_sparse: make_env(reward="sparse"): our plumbing alone (torch in/out, final observations, episode metrics);
- ours_staged: make_env(reward="staged"): plumbing plus the staged reward (a contact query and ~50 tensor ops).
The plumbing overhead is ours_sparse vs raw_sparse; the staged reward's cost is ours_staged vs ours_sparse.

    python benchmarks/env_overhead.py --num-envs 2 --steps 1000 --rounds 5
"""

import functools
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


def _raw_cpu_worker(reward_mode):
    import gymnasium as gym
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    torch.set_num_threads(1)
    env = gym.make(common.ENV_ID, obs_mode="state", control_mode="pd_ee_delta_pose", sim_backend="physx_cpu",
                   reconfiguration_freq=10, enhanced_determinism=True, reward_mode=reward_mode)
    return CPUGymWrapper(env)


def make_raw(backend, num_envs, reward_mode):
    import gymnasium as gym

    if backend == "physx_cuda":
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        env = gym.make(common.ENV_ID, num_envs=num_envs, obs_mode="state", control_mode="pd_ee_delta_pose",
                       sim_backend="physx_cuda", reward_mode=reward_mode)
        return ManiSkillVectorEnv(env, num_envs, auto_reset=True)
    return gym.vector.AsyncVectorEnv([functools.partial(_raw_cpu_worker, reward_mode)] * num_envs, context="spawn",
                                     autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def main(args: Args):
    backend = common.resolve_sim_backend(args.sim_backend)
    envs = {
        "raw_sparse": make_raw(backend, args.num_envs, "sparse"),
        "raw_dense": make_raw(backend, args.num_envs, "normalized_dense"),
        "ours_sparse": common.make_env(args.num_envs, backend, reward="sparse", seed=0),
        "ours_staged": common.make_env(args.num_envs, backend, reward="staged", seed=0),
    }
    device = envs["ours_staged"].device
    gen = torch.Generator().manual_seed(0)
    actions = (torch.rand(args.steps, args.num_envs, 7, generator=gen) * 2 - 1).to(device)
    sync = torch.cuda.synchronize if backend == "physx_cuda" else (lambda: None)
    times = dict.fromkeys(envs, 0.0)
    for env in envs.values():
        env.reset(seed=0)
    for _ in range(args.rounds):
        for name, env in envs.items():
            acts = actions if name.startswith("ours") or backend == "physx_cuda" else actions.cpu().numpy()
            sync()
            start = time.perf_counter()
            for t in range(args.steps):
                env.step(acts[t])
            sync()
            times[name] += time.perf_counter() - start
    for env in envs.values():
        env.close()
    n = args.rounds * args.steps * args.num_envs
    result = dict(
        sim_backend=backend,
        num_envs=args.num_envs,
        env_steps_per_variant=n,
        **{f"{k}_sps": n / v for k, v in times.items()},
        plumbing_overhead=times["ours_sparse"] / times["raw_sparse"] - 1,
        staged_reward_cost=times["ours_staged"] / times["ours_sparse"] - 1,
        staged_factory_over_raw_sparse=times["raw_sparse"] / times["ours_staged"],
        staged_factory_over_raw_dense=times["raw_dense"] / times["ours_staged"],
        device=torch.cuda.get_device_name() if backend == "physx_cuda" else f"CPU, {os.cpu_count()} cores",
    )
    print(json.dumps(result))
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    common.exit_on_config_error(lambda: main(tyro.cli(Args)))
