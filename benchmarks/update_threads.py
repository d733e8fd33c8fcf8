"""Time of one residual-SAC update (critic + actor, batch 256, width 256) with 1 vs 2 learner threads, while the two
CPU env workers of a training run keep the cores busy (simulated here by stepping a 2-env VecEnv in the background).

    python benchmarks/update_threads.py

Writes benchmarks/results/update_threads.json: ms per update for each thread count, measured in one run.
"""

import json
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from sac_residual import Actor, SoftQNetwork  # noqa: E402


@dataclass
class Args:
    rounds: int = 100
    """timed updates per thread count"""


def update_ms(threads, rounds):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    obs_dim, act_dim = common.STATE_DIM + common.TASK_FEATURE_DIM + 7, 7
    actor = Actor(obs_dim, act_dim, 256, 0.2)
    qf1, qf2 = SoftQNetwork(obs_dim, act_dim, 256, True), SoftQNetwork(obs_dim, act_dim, 256, True)
    q_opt = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()))
    a_opt = torch.optim.Adam(actor.parameters())
    x, a, r = torch.randn(256, obs_dim), torch.rand(256, act_dim) * 2 - 1, torch.randn(256, 1)

    def update():
        with torch.no_grad():
            next_a, _, _ = actor.get_action(x)
            target = r + 0.95 * torch.min(qf1(x, next_a), qf2(x, next_a))
        q_loss = ((qf1(x, a) - target) ** 2).mean() + ((qf2(x, a) - target) ** 2).mean()
        q_opt.zero_grad(), q_loss.backward(), q_opt.step()
        a_res, _, _ = actor.get_action(x)
        a_loss = -torch.min(qf1(x, a_res), qf2(x, a_res)).mean()
        a_opt.zero_grad(), a_loss.backward(), a_opt.step()

    for _ in range(10):
        update()
    t0 = time.perf_counter()
    for _ in range(rounds):
        update()
    return (time.perf_counter() - t0) / rounds * 1000


def main(args: Args):
    envs = common.make_env(2, "physx_cpu", seed=0)
    envs.reset(seed=0)
    stop = threading.Event()

    def step_envs():  # the env workers simulate in their own processes, as during training
        while not stop.is_set():
            envs.step(torch.zeros(2, 7))

    stepper = threading.Thread(target=step_envs)
    stepper.start()
    try:
        result = {f"ms_per_update_{n}_threads": update_ms(n, args.rounds) for n in (1, 2, 1, 2)}  # interleaved, last of each kept
    finally:
        stop.set(), stepper.join(), envs.close()
    result.update(device=f"CPU, {os.cpu_count()} cores", command="python benchmarks/update_threads.py")
    print(json.dumps(result))
    with open("benchmarks/results/update_threads.json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(Args))
