"""Where an on-policy env step's wall time goes on the CPU: the simulator, the rest of env.step, the base, the residual.

PPO cannot overlap its per-step work with the simulator (its next action needs the next observation), so its
training steps/s over the simulator's own steps/s is at most sim / (sim + everything else per step). This benchmark
steps the training envs (2 CPU workers, staged reward) with the `coarse` base, and in alternate rounds also with the
per-step work of ppo_residual.py's residual (task features, the observation normaliser's update, the policy and value
forward pass, composing the action), and reports per vector step:
- sim: the simulator's own time (`VecEnv.sim_time`: the slowest worker's env.step and auto-reset),
- env_rest: the rest of the env.step call (inter-process transfer, waking the workers, batching the results),
- base: the base policy (its call and its reset hook),
- residual: the residual's forward pass and its inputs (the `residual` rounds only),
and the ceiling sim / wall of each variant: the throughput ratio a learner with no update cost could reach.

    python benchmarks/step_budget.py --steps 1500 --rounds 2
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from ppo_residual import Agent  # noqa: E402


@dataclass
class Args:
    steps: int = 1500
    """vector steps per round and variant (the first 200 of each are not timed)"""
    rounds: int = 2
    """interleaved rounds (base, residual, base, residual, ...)"""
    num_envs: int = 2
    """CPU envs (one worker process each)"""
    out: str = "benchmarks/results/step_budget.json"
    """where to write the JSON result"""


def measure(envs, base, agent, obs_rms, steps):
    """Mean ms per vector step of each part, over `steps` after 200 untimed ones."""
    obs = envs.reset(seed=1, reconfigure=True)
    base.reset(torch.ones(envs.num_envs, dtype=torch.bool), seed=1)
    a_base = base(obs)
    parts = dict(sim=0.0, env_rest=0.0, base=0.0, residual=0.0)
    for i in range(200 + steps):
        if i == 200:
            parts, sim0, t_start = dict.fromkeys(parts, 0.0), envs.sim_time, time.perf_counter()
        t0 = time.perf_counter()
        action = a_base
        if agent is not None:  # ppo_residual.py's per-step work, as in its rollout loop
            with torch.no_grad():
                res_state = common.residual_state(obs["state"], True)
                obs_rms.update(res_state)
                x = torch.cat([obs_rms.normalize(res_state), a_base], -1)
                u, _, _, _ = agent.get_action_and_value(x)
            action = common.compose_action(a_base, torch.where(torch.isfinite(u), u, 0.0).tanh(), 0.1)
        t1 = time.perf_counter()
        obs, _, terminated, truncated, _ = envs.step(action)
        t2 = time.perf_counter()
        base.reset(terminated | truncated)
        a_base = base(obs)
        t3 = time.perf_counter()
        parts["residual"] += t1 - t0
        parts["env_rest"] += t2 - t1
        parts["base"] += t3 - t2
    wall = time.perf_counter() - t_start
    parts["sim"] = envs.sim_time - sim0
    parts["env_rest"] -= parts["sim"]
    out = {k: round(1000 * v / steps, 3) for k, v in parts.items()}
    out["wall"] = round(1000 * wall / steps, 3)
    out["ceiling_sim_over_wall"] = round(parts["sim"] / wall, 3)
    return out


def main(args: Args):
    torch.set_num_threads(1)  # as the training scripts' learner
    torch.manual_seed(1)
    envs = common.make_env(args.num_envs, "physx_cpu", seed=1)
    base = common.make_base_policy("coarse", envs, seed=1)
    res_dim = envs.state_dim + common.TASK_FEATURE_DIM
    agent = Agent(res_dim + envs.action_dim, envs.action_dim, 256, 0.2, False)  # ppo_residual.py's defaults
    obs_rms = common.RunningMeanStd(res_dim)
    results = {"base_only": [], "base_and_residual": []}
    try:
        for k in range(args.rounds):
            for name, a in (("base_only", None), ("base_and_residual", agent)):
                results[name].append(measure(envs, base, a, obs_rms, args.steps))
                print(f"round {k} {name}: {results[name][-1]}", flush=True)
    finally:
        envs.close()
    mean = {name: {key: round(sum(r[key] for r in rs) / len(rs), 3) for key in rs[0]} for name, rs in results.items()}
    out = dict(command="python benchmarks/step_budget.py " + " ".join(sys.argv[1:]),
               device=f"CPU, {os.cpu_count()} cores", num_envs=args.num_envs, steps=args.steps, rounds=results,
               mean_ms_per_vector_step=mean)
    print(json.dumps(mean))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(Args))
