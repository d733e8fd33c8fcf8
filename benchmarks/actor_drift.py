"""How far a residual SAC actor has moved from the base, and what its critics think of that, on the run's own data.

    python benchmarks/actor_drift.py --checkpoint runs/<run>/ckpt.pt [--checkpoint ...] --out results/x.json

Over the last --num-states states of each checkpoint's replay buffer (the states its recent rollouts visited), per
action dimension: the mean |tanh(mean)| of the residual (1: at the bound), the fraction of states where it is past
0.95 (saturated: tanh's gradient, and the L2 pull's, are nearly gone there) and the policy's std. And the critics'
min over the ensemble at three actions of the same states: the executed action stored in the buffer (the data), the
actor's deterministic action, and the base's action (no residual). A critic that overrates the actor's actions puts
the second far above the first; a critic that still prefers the base at the states the actor now visits puts the
third above the second. The critics' spread (max - min over the ensemble) at the actor's action is what an
ensemble's pessimism has to work with. Last, the signal against the noise: the range of the critics' value over the
whole residual box at a state (16 uniform residuals) against the RMS error of the critics on their own training
targets. A run with --residual-hold k is measured where its critics are trained: on its decision states, against its
decision targets.
"""

import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


@dataclass
class Args:
    checkpoint: list[str] = field(default_factory=list)
    """sac_residual.py checkpoints"""
    num_states: int = 20_000
    """the last this many buffer states of each run"""
    out: Optional[str] = None
    """JSON output path (none: print only)"""


@torch.no_grad()
def drift(path, num_states):
    sac = importlib.import_module("sac_residual")
    ckpt = common.load_checkpoint(path, "sac_residual.py")
    a, data = ckpt["args"], ckpt["rb"]["data"]
    n = len(data["obs"])
    order = (torch.arange(n) + ckpt["rb"]["ptr"]) % n if ckpt["rb"]["full"] else torch.arange(n)  # oldest first
    hold = a.get("residual_hold", 1)  # with --residual-hold the critics score decisions: their states only
    if hold > 1:
        order = order[data["phase"][order, 0] == 0]
    idx = order[-num_states:]
    obs, a_base, action = data["obs"][idx], data["a_base"][idx], data["action"][idx]
    act_dim = a_base.shape[1]
    obs_rms = common.RunningMeanStd(obs.shape[1])
    obs_rms.load_state_dict(ckpt["obs_rms"])

    def rl_obs(s, base):
        s = obs_rms.normalize(s)
        return torch.cat([s, base], -1) if a["residual_sees_base"] else s

    def load_critics(key):
        """The critics ("qfs") or their targets ("qfs_target"); checkpoints from before --num-q name two: qf1, qf2."""
        state = ckpt.get(key) or {f"{i}.{k}": v for i, name in enumerate(("qf1", "qf2"))
                                  for k, v in ckpt[name + key[3:]].items()}
        scale = a["residual_scale"] if a.get("critic_sees_residual") else None
        nets = torch.nn.ModuleList(sac.SoftQNetwork(x.shape[1], act_dim, a["hidden_dim"], a["layer_norm"], scale)
                                   for _ in range(len({k.split(".")[0] for k in state})))
        nets.load_state_dict(state)
        return nets

    x = rl_obs(obs, a_base)
    actor = sac.Actor(x.shape[1], act_dim, a["hidden_dim"], a["init_std"], a.get("residual_dims"))
    actor.load_state_dict(ckpt["actor"])
    qfs, targets = load_critics("qfs"), load_critics("qfs_target")
    num_q = len(qfs)
    mean, log_std = actor(x)
    res = mean.tanh()
    pi_action = common.compose_action(a_base, actor.expand(res), a["residual_scale"])

    q_pi = torch.stack([qf(x, pi_action) for qf in qfs])  # every critic at the actor's action

    def min_q(act, states=x):
        return torch.stack([qf(states, act) for qf in qfs]).min(0).values

    # how much the critics' value moves across the whole residual box at a state: 16 uniform residuals on the
    # residual's dimensions, the range of their values, averaged over (the first 2,000) states
    g = torch.Generator().manual_seed(0)
    xs, bs = x[:2000].repeat(16, 1), a_base[:2000].repeat(16, 1)
    box = actor.expand(torch.rand(len(xs), len(actor.dims), generator=g) * 2 - 1)
    q_box = min_q(common.compose_action(bs, box, a["residual_scale"]), xs).view(16, -1)
    # and the critics' error against their own targets (as in training: n-step, target critics, the actor's next
    # action), on transitions drawn from the whole buffer
    rb = sac.ReplayBuffer(n, obs.shape[1], act_dim, a["num_envs"], "cpu")
    rb.load_state_dict(ckpt["rb"])
    torch.manual_seed(0)
    b = rb.sample(4096, a["n_step"], a["gamma"], hold)
    next_x = rl_obs(b["next_obs"], b["next_a_base"])
    next_res, next_log_pi, _ = actor.get_action(next_x)
    next_action = common.compose_action(b["next_a_base"], next_res, a["residual_scale"])
    m = a.get("num_q_target", 2)  # the min over a random m of the target critics, as in training (all when m >= N)
    members = range(num_q) if m >= num_q else torch.randperm(num_q)[:m].tolist()
    next_q = torch.stack([targets[i](next_x, next_action) for i in members]).min(0).values
    soft_v_next = next_q - ckpt["log_alpha"].exp() * next_log_pi[:, None]
    target = b["reward"] + (1 - b["terminated"]) * b["discount"] * soft_v_next
    td = torch.stack([qf(rl_obs(b["obs"], b["a_base"]), b["action"]) for qf in qfs]) - target

    return dict(
        checkpoint=path, run_name=ckpt["run_name"], global_step=ckpt["global_step"], states=len(idx),
        residual_dims=actor.dims.tolist(), residual_l2=a["residual_l2"], num_q=num_q, residual_hold=hold,
        mean_abs_tanh_mean=res.abs().mean(0).tolist(), saturated_frac=(res.abs() > 0.95).float().mean(0).tolist(),
        policy_std=log_std.exp().mean(0).tolist(),
        min_q_at_data=min_q(action).mean().item(), min_q_at_actor=q_pi.min(0).values.mean().item(),
        min_q_at_base=min_q(a_base).mean().item(),
        q_range_over_residual_box=(q_box.max(0).values - q_box.min(0).values).mean().item(),
        critics_spread_at_actor=(q_pi.max(0).values - q_pi.min(0).values).mean().item(),
        td_error_rms=td.pow(2).mean().sqrt().item(),
    )


def main(args: Args):
    if not args.checkpoint:
        raise common.ConfigError("give at least one --checkpoint")
    rows = [drift(p, args.num_states) for p in args.checkpoint]
    for r in rows:
        print(f"{r['run_name']} @ {r['global_step']}: mean |tanh(mean)| "
              f"{[round(v, 2) for v in r['mean_abs_tanh_mean']]}, "
              f"saturated {[round(v, 2) for v in r['saturated_frac']]}"
              f"; min Q at data {r['min_q_at_data']:.2f}, at the actor {r['min_q_at_actor']:.2f}, at the base "
              f"{r['min_q_at_base']:.2f}; spread of the critics at the actor {r['critics_spread_at_actor']:.3f}; "
              f"Q range over the residual box {r['q_range_over_residual_box']:.3f}, "
              f"TD error RMS {r['td_error_rms']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join(["python", *sys.argv]), rows=rows), f, indent=1)


if __name__ == "__main__":
    common.exit_on_config_error(lambda: main(tyro.cli(Args)))
