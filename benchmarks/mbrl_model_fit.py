"""How well mbrl_residual.py's dynamics ensemble fits PegInsertionSide, and whether its disagreement points at its
errors.

Collects real transitions from the `coarse` base with a small random residual (what the residual's exploration adds
early in training), holds out the most recent ones, and fits mbrl_residual.py's DynamicsEnsemble on the rest with its
own loss and batch, measuring after each budget of gradient steps (cumulative):
- val_state_mse: the ensemble mean's squared error on the next state's change, in units of that change's std,
- val_reward_mae: its absolute error on the staged reward (per step; 4 mm of lateral error costs about 0.004),
- disagreement_error_corr: the Spearman rank correlation, over held-out transitions, between the members' disagreement
  (mbrl_residual.imagine's measure) and the mean's actual next-state error; _reward: the same for the reward error,
- err_low_half / err_high_half: the mean next-state error of the half with the lower / higher disagreement (a cut that
  keeps the lower half helps only if the first is clearly smaller),
- val_reward_mae_geometric: the error of the staged reward computed by common.staged_reward_terms from the ensemble
  mean's *predicted* next state, given the true grasp contact and success of that transition (what the simulator
  knows and the state does not): how well a reward the model need not learn would do, against val_reward_mae;
  _true_state: the same formula on the true next state (a check: about 0); _carried_flags: with the contact and
  success of the transition's *start* state instead, as an imagined step branched from a real state would know them;
  _of_state: what `mbrl_residual.py --model-reward staged` computes, mbrl_residual.staged_reward_of_state of the
  predicted next state (the grasp read from that state, success from the predicted termination),
- val_grasp_agreement: how often mbrl_residual.tail_grasp_of_state of the true next state agrees with the simulator's
  contact flag (false_grasp, missed_grasp: the two kinds of disagreement, as fractions of the held-out transitions).

    python benchmarks/mbrl_model_fit.py --steps 20000 --budgets 200 1000 3000
    python benchmarks/mbrl_model_fit.py --reward-lateral 10 --out benchmarks/results/mbrl_model_fit_lateral10.json
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from mbrl_residual import (DynamicsEnsemble, ReplayBuffer, model_targets, staged_reward_of_state,  # noqa: E402
                           tail_grasp_of_state)


@dataclass
class Args:
    steps: int = 20_000
    """real env steps to collect (all envs together)"""
    holdout: int = 2_000
    """the most recent transitions, held out to measure the fit"""
    budgets: List[int] = field(default_factory=lambda: [200, 1000, 3000])
    """cumulative gradient steps at which to measure (mbrl_residual.py trains 200 per round by default)"""
    num_envs: int = 2
    residual_std: float = 0.2
    """the random residual's pre-tanh std (mbrl_residual.py's --init-std), scaled by --residual-scale"""
    residual_scale: float = 0.1
    reward_lateral: float = 0.0
    """the staged reward's lateral term (mbrl_residual.py's --reward-lateral; its default is 10)"""
    ensemble_size: int = 5
    model_hidden_dim: int = 200
    model_lr: float = 1e-3
    model_batch_size: int = 256
    seed: int = 0
    out: str = "benchmarks/results/mbrl_model_fit.json"


def spearman(a, b):
    ra, rb = (x.argsort().argsort().float() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(args):
    common.seed_everything(args.seed, True)
    torch.set_num_threads(1)
    reward_cfg = common.StagedRewardConfig(d3=args.reward_lateral)
    envs = common.make_env(args.num_envs, "physx_cpu", seed=args.seed, reward_cfg=reward_cfg)
    base = common.make_base_policy("coarse", envs, seed=args.seed)
    state_dim, act_dim = envs.state_dim, envs.action_dim
    rb = ReplayBuffer(args.steps, state_dim, act_dim, args.num_envs, "cpu")
    t0 = time.perf_counter()
    obs = envs.reset(seed=args.seed)
    a_base = base(obs)
    successes = episodes = 0
    contact, success = [], []  # of each transition's next state, in the buffer's row order
    grasp_stage = torch.tensor(reward_cfg.stage_offsets[0])
    for _ in range(args.steps // args.num_envs):
        a_res = torch.tanh(args.residual_std * torch.randn(args.num_envs, act_dim))
        action = common.compose_action(a_base, a_res, args.residual_scale)
        next_obs, reward, terminated, truncated, info = envs.step(action)
        done = terminated | truncated
        base.reset(done)
        next_a_base = base(next_obs)
        rb.add(obs=obs["state"], a_base=a_base, action=action, reward=reward, next_obs=info["final_obs"]["state"],
               next_a_base=torch.where(done[:, None], a_base, next_a_base), terminated=terminated, done=done)
        contact.append(~info["success"] & ((info["reward/stage"] - grasp_stage).abs() > 1e-6))  # past stage 1
        success.append(info["success"])
        successes += int((info["episode"]["success_at_end"] * done).sum())
        episodes += int(done.sum())
        obs, a_base = next_obs, next_a_base
    envs.close()
    collect_s = time.perf_counter() - t0
    n = rb.ptr if not rb.full else rb.size
    n_train = n - args.holdout
    train = {k: v[:n_train] for k, v in rb.data.items()}
    val = {k: v[n_train:n] for k, v in rb.data.items()}
    contact, success = torch.cat(contact)[:n], torch.cat(success)[:n]
    # the start state's flags: the same env's previous transition's, none at an episode's first step
    started = ~rb.data["done"][:n, 0].bool().roll(args.num_envs)
    prev_contact, prev_success = (x.roll(args.num_envs) & started for x in (contact, success))
    flags = dict(next=(contact[n_train:], success[n_train:]), start=(prev_contact[n_train:], prev_success[n_train:]))

    def geometric_reward(next_state, which="next"):
        return sum(common.staged_reward_terms(next_state, *flags[which], reward_cfg).values())

    model = DynamicsEnsemble(args.ensemble_size, state_dim + 2 * act_dim, state_dim + act_dim + 1,
                             args.model_hidden_dim)
    opt = torch.optim.Adam(model.parameters(), lr=args.model_lr)
    model.fit_scalers(*model_targets(train)[:2])
    rows, done_updates = [], 0
    t0 = time.perf_counter()
    for budget in sorted(args.budgets):
        while done_updates < budget:
            idx = torch.randint(0, n_train, (args.ensemble_size * args.model_batch_size,))
            x, y, term = model_targets({k: v[idx] for k, v in train.items()})
            loss, _ = model.loss(x.view(args.ensemble_size, args.model_batch_size, -1),
                                 y.view(args.ensemble_size, args.model_batch_size, -1),
                                 term.view(args.ensemble_size, args.model_batch_size))
            opt.zero_grad()
            loss.backward()
            opt.step()
            done_updates += 1
        with torch.no_grad():
            x, y, term = model_targets(val)
            mean, _, term_p = model.predict(x)
            grasp = tail_grasp_of_state(val["next_obs"])
            # the same measure mbrl_residual.imagine cuts on
            disagreement = (mean[..., :state_dim] / model.x_std[:state_dim]).std(0).mean(-1)
            err = (((mean.mean(0) - y)[:, :state_dim] / model.y_std[:state_dim]) ** 2).mean(-1)
            reward_err = (mean.mean(0) - y)[:, -1].abs()
            next_state = val["obs"] + mean.mean(0)[:, :state_dim]
            reward_geo_err = (geometric_reward(next_state) - y[:, -1]).abs()
            low = disagreement <= disagreement.median()
            rows.append(dict(
                updates=budget, seconds=time.perf_counter() - t0, val_state_mse=float(err.mean()),
                val_reward_mae=float(reward_err.mean()), val_reward_mae_geometric=float(reward_geo_err.mean()),
                val_reward_mae_geometric_true_state=float((geometric_reward(val["next_obs"]) - y[:, -1]).abs().mean()),
                val_reward_mae_geometric_carried_flags=float(
                    (geometric_reward(next_state, "start") - y[:, -1]).abs().mean()),
                val_reward_mae_geometric_of_state=float(
                    (staged_reward_of_state(next_state, term_p.mean(0) > 0.5, reward_cfg) - y[:, -1]).abs().mean()),
                val_grasp_agreement=float((grasp == flags["next"][0]).float().mean()),
                false_grasp=float((grasp & ~flags["next"][0]).float().mean()),
                missed_grasp=float((~grasp & flags["next"][0]).float().mean()),
                val_term_acc=float(((term_p.mean(0) > 0.5).float() == term).float().mean()),
                disagreement_mean=float(disagreement.mean()),
                disagreement_error_corr=spearman(disagreement, err),
                disagreement_error_corr_reward=spearman(disagreement, reward_err),
                err_low_half=float(err[low].mean()), err_high_half=float(err[~low].mean()),
                reward_err_low_half=float(reward_err[low].mean()), reward_err_high_half=float(reward_err[~low].mean()),
            ))
            print(json.dumps(rows[-1]), flush=True)
    out = dict(command="python " + " ".join(sys.argv), args=vars(args), collect_s=collect_s, transitions=n,
               episodes=episodes, success_at_end=successes / max(episodes, 1),
               reward_std=float(rb.data["reward"][:n].std()), results=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    common.exit_on_config_error(lambda: main(tyro.cli(Args)))
