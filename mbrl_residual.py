"""Model-based residual RL (MBPO): an ensemble of probabilistic dynamics models in the residual's own observation space
feeds short imagined rollouts to residual SAC, so each real env step teaches more.

    a_t = clip(a_base + scale * a_res),  a_res ~ pi_RL(. | [s_t, a_base]),  a_base = M_phi(v_theta(s_t, c))  (eq. 1)
    p_theta([s', a_base'], r, done | [s, a_base], a_t)  for theta in an ensemble of E models  (Janner et al. 2019)

The model predicts the next base action as part of the next observation, so imagined rollouts never query the base (a
VLA cannot see imagined states), plus the reward and the termination. Rollouts branch from real states, take one random
member per step (TS1), and stop where the ensemble disagrees (contact at 3 mm clearance is where learned models break).
SAC learns on a mix of real and imagined transitions; everything else (bounded zero-initialised residual, critic
warm-up, progressive exploration, exact resume) is sac_residual.py's.

    python mbrl_residual.py                                   # CPU, 2 envs, the offline `coarse` base
    python mbrl_residual.py --evaluate --checkpoint runs/<run>/ckpt.pt

Logged: as sac_residual.py (train/*, eval/*, eval_base/*, reward/*, losses/*, residual/*, charts/*, time/*) plus
model/{train_loss,val_loss,val_state_mse,val_reward_mae,val_term_acc,val_disagreement_error_corr,cut_threshold,
disagreement,rollout_kept,rollout_len,model_buffer} and time/model.
"""

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common


@dataclass
class Args:
    # experiment
    exp_name: str = "mbrl_residual"
    """the name of this experiment (runs/<exp_name>__<seed>__<time>)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """whether to set torch.backends.cudnn.deterministic"""
    cuda: bool = True
    """whether to use CUDA when available"""
    capture_video: bool = False
    """whether to save eval videos under runs/<run>/videos"""
    save_model: bool = True
    """whether to save a checkpoint at every evaluation and at the end"""
    evaluate: bool = False
    """whether to only evaluate --checkpoint and exit"""
    checkpoint: Optional[str] = None
    """checkpoint to resume from (or to evaluate with --evaluate)"""
    save_trajectories: Optional[str] = None
    """with --evaluate: folder for the successful episodes in ManiSkill's trajectory format (the data flywheel)"""

    # environment
    env_id: str = common.ENV_ID
    """the ManiSkill task"""
    num_envs: int = 2
    """parallel training envs (CPU: one process each; GPU: e.g. 512)"""
    num_eval_envs: int = 2
    """parallel eval envs"""
    num_eval_episodes: int = 50
    """episodes per evaluation (ManiSkill's protocol: full length, reconfigured)"""
    eval_freq: int = 25_000
    """evaluate (and checkpoint) every this many env steps"""
    control_mode: str = "pd_ee_delta_pose"
    """the controller; the scripted bases need pd_ee_delta_pose"""
    sim_backend: str = "auto"
    """auto (GPU if CUDA is there), physx_cuda or physx_cpu"""
    reward: str = "staged"
    """staged (paper section 2.3), normalized_dense (ManiSkill's) or sparse"""
    reward_lateral: float = 10.0
    """with the staged reward (ignored by the others): weight of a term for the peg head's lateral distance from the
    hole axis while inserting (per metre, clipped at 2 cm; common.StagedRewardConfig.d3). 0 is the paper's reward, where
    4 mm of aim error costs 0.004 per step; at 10 it costs 0.04. Measured on `coarse` (seeds 1, 3): 0.54 and 0.64
    success at 100k env steps against 0.46 and 0.52 with 0 (RESULTS.md)"""
    total_timesteps: int = 100_000
    """total env steps (half of sac_residual.py's: saving samples is the point)"""
    max_episode_steps: Optional[int] = None
    """episode length of the training and eval envs (None: the task's, 100 steps for PegInsertionSide-v1);
    shorter only for quick runs and tests: success_at_end is defined at the task's limit"""

    # base policy and residual
    base: str = "coarse"
    """the frozen base: pi0:<hub id or folder>, expert, coarse[:key=value,...] or zero"""
    residual_scale: float = 0.1
    """bound of the residual in action units: a = clip(a_base + scale * tanh(.)) (Policy Decorator's alpha)"""
    residual_sees_base: bool = True
    """whether the residual observes [s, a_base] (paper 2.1) rather than s alone (RPL's finding)"""
    task_features: bool = True
    """whether the residual also observes common.task_features(s): the head's offset from the hole axis, depth, tilt"""

    # algorithm: SAC (as sac_residual.py)
    gamma: float = 0.95
    """the discount factor (100-step episodes, and success ends the episode)"""
    n_step: int = 5
    """n-step returns for the real transitions' critic targets (sac_residual.py's measured default; imagined
    transitions stay 1-step)"""
    tau: float = 0.01
    """target smoothing coefficient"""
    batch_size: int = 256
    """the batch size of each SAC update"""
    buffer_size: int = 1_000_000
    """the real replay memory size (capped at total_timesteps)"""
    learning_starts: int = 5_000
    """env steps of base-only rollouts before any update: the critic's and the model's first data"""
    critic_warmup_updates: int = 2_000
    """critic-only updates on that data before the actor starts learning"""
    progressive_steps: int = 20_000
    """after the warm-up the residual acts in each env-step with probability min(t / this, 1) (Policy Decorator)"""
    utd: float = 1.0
    """SAC updates per env step: twice sac_residual.py's, as imagined data makes more updates useful (MBPO uses 20)"""
    policy_lr: float = 3e-4
    """the learning rate of the actor"""
    q_lr: float = 3e-4
    """the learning rate of the critics"""
    policy_frequency: int = 1
    """actor (and alpha) updates every this many critic updates"""
    target_network_frequency: int = 1
    """target network updates every this many critic updates"""
    alpha: float = 0.001
    """entropy coefficient (initial value when autotuned): per-step rewards are O(0.1), see sac_residual.py"""
    autotune: bool = False
    """whether to tune alpha towards target_entropy (off, as in sac_residual.py)"""
    target_entropy: float = -7.0
    """the entropy target (per action; -action_dim is the usual choice)"""
    residual_l2: float = 0.1
    """weight of an L2 penalty on the residual's (tanh) mean action in the actor loss (stay on the base unless sure;
    sac_residual.py's measured default)"""
    init_std: float = 0.2
    """initial std of the residual's pre-tanh Gaussian"""
    layer_norm: bool = True
    """whether the critics use LayerNorm"""
    hidden_dim: int = 256
    """width of the actor and critic MLPs"""

    # algorithm: model
    ensemble_size: int = 5
    """models in the ensemble (MBPO: 7, keeping the best 5; we keep all)"""
    model_hidden_dim: int = 200
    """width of each model's MLP"""
    model_lr: float = 1e-3
    """the learning rate of the models"""
    model_train_freq: int = 1_000
    """retrain the models and refill the imagined buffer every this many env steps"""
    model_updates: int = 200
    """gradient steps per model training round (each member on its own bootstrap batch)"""
    model_batch_size: int = 256
    """the batch size per member"""
    holdout: int = 1_000
    """the most recent real transitions held out from training to measure the model (val loss, per-step error)"""
    rollout_batch_size: int = 20_000
    """imagined rollouts branched from real states per round (MBPO branches 400 per env step). With the cut keeping
    about a third of the steps, 2,000 left so few imagined transitions that each was drawn ~120 times, and two seeds
    fell below the base (0.28, 0.30 at 50k); 20,000: 0.42, 0.38 (benchmarks/results/mbrl_residual_rollouts20k.json)"""
    rollout_horizon: int = 3
    """imagined steps per rollout: short, because errors compound and contact is hard to predict"""
    max_disagreement: float = 0.1
    """cut a rollout where the members' std of the predicted next state (in units of the state's own std, averaged
    over dims) exceeds this: the models disagree, so none of them is to be trusted"""
    disagreement_quantile: float = 0.5
    """... or exceeds this quantile of the disagreement on held-out real transitions, recalibrated every round
    (1: cut only beyond the most uncertain held-out transition). The fixed bound alone never cut (disagreement stays
    near 0.01-0.02), yet disagreement does rank the model's errors: on held-out transitions the less uncertain half had
    0.16-0.45 times the other half's next-state error (python benchmarks/mbrl_model_fit.py)"""
    model_reward: str = "learned"
    """the imagined steps' reward: `learned` (the ensemble's reward output) or `staged` (the staged reward computed
    from the predicted next state by staged_reward_of_state, success from the predicted termination; needs --reward
    staged on PegInsertionSide-v1). On held-out real transitions the learned output errs by 0.049-0.067 per step, the
    formula on the predicted state by 0.034 falling to 0.009 as the model trains, against the 0.04 that 4 mm of aim
    error costs at --reward-lateral 10 (benchmarks/mbrl_model_fit.py, RESULTS.md). In training (seeds 1, 3, to 100k)
    it did not help: 0.58 and 0.62 at 100k against 0.54 and 0.64 with `learned`, lower on the way (0.32, 0.62 at 50k
    against 0.46, 0.58), so not the default"""
    model_retain_rounds: int = 5
    """imagined transitions are kept for this many rounds (the imagined buffer's size)"""
    real_ratio: float = 0.5
    """fraction of each SAC batch drawn from real transitions (MBPO: 0.05; a residual on a good base has little to
    gain from a model's guess about states far from the base's behaviour, so we keep more real data)"""

    # speed
    compile: bool = False
    """whether to torch.compile the update and policy functions"""
    threads: int = 1
    """torch threads of the learner when it runs on the CPU: the env workers are processes of their own, and a second
    learner thread that fights them for 2 cores made an update 2.3x slower (python benchmarks/update_threads.py)"""

    # runtime
    log_freq: int = 2_000
    """log every this many env steps"""


# ------------------------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------------------------
def mlp(in_dim, out_dim, hidden, layer_norm):
    norm = (lambda: nn.LayerNorm(hidden)) if layer_norm else nn.Identity
    return nn.Sequential(
        nn.Linear(in_dim, hidden), norm(), nn.ReLU(), nn.Linear(hidden, hidden), norm(), nn.ReLU(),
        nn.Linear(hidden, out_dim),
    )


class SoftQNetwork(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden, layer_norm):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden, layer_norm)

    def forward(self, x, a):
        return self.net(torch.cat([x, a], -1))


LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0
EPISODE_KEYS = ("return", "episode_len", "success_once", "success_at_end")
ARCH_ARGS = ("env_id", "control_mode", "residual_scale", "residual_sees_base", "task_features",
             "hidden_dim", "layer_norm")


class Actor(nn.Module):
    """Tanh-Gaussian residual. The mean head starts at exactly zero, so the untrained residual is the base itself."""

    def __init__(self, obs_dim, act_dim, hidden, init_std):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        nn.init.zeros_(self.mean.weight), nn.init.zeros_(self.mean.bias)
        nn.init.zeros_(self.log_std.weight), nn.init.constant_(self.log_std.bias, math.log(init_std))

    def forward(self, x):
        h = self.trunk(x)
        return self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def get_action(self, x):
        mean, log_std = self(x)
        std = log_std.exp()
        x_t = mean + std * torch.randn_like(mean)  # reparameterisation
        y_t = torch.tanh(x_t)
        log_prob = (-0.5 * ((x_t - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - torch.log(1 - y_t.pow(2) + 1e-6).sum(-1)
        return y_t, log_prob, torch.tanh(mean)


# ------------------------------------------------------------------------------------------------------------------
# Replay buffer on the training device
# ------------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Raw states (normalised at sample time, so stored data never goes stale), base actions and executed actions.

    Rows are added one env step at a time, `num_envs` rows per step, so env i's next step sits `num_envs` rows later:
    `sample(..., n_step)` walks that far to build n-step returns (as in sac_residual.py; the size is a multiple of
    num_envs, so wrapping keeps the pattern). The imagined buffer is sampled 1-step."""

    FIELDS = ("obs", "a_base", "action", "reward", "next_obs", "next_a_base", "terminated", "done")

    def __init__(self, size, state_dim, act_dim, num_envs, device):
        dims = dict(obs=state_dim, a_base=act_dim, action=act_dim, reward=1, next_obs=state_dim,
                    next_a_base=act_dim, terminated=1, done=1)
        size = max(size // num_envs, 1) * num_envs
        self.data = {k: torch.zeros(size, dims[k], device=device) for k in self.FIELDS}
        self.size, self.num_envs, self.ptr, self.full = size, num_envs, 0, False

    def add(self, **batch):
        n = batch["obs"].shape[0]
        idx = (self.ptr + torch.arange(n, device=self.data["obs"].device)) % self.size
        for k in self.FIELDS:
            self.data[k][idx] = batch[k].reshape(n, -1).float()
        self.full = self.full or self.ptr + n >= self.size
        self.ptr = (self.ptr + n) % self.size

    def sample(self, batch_size, n_step=1, gamma=1.0):
        """A batch of transitions; with n_step > 1 each is an n-step one: `reward` is the discounted sum of up to
        n rewards of the same env, stopping at an episode end or at the newest data, `next_*` and `terminated` are
        those of its last step, and `discount` is gamma ** (steps summed) (uncorrected n-step returns, as in
        sac_residual.py)."""
        high = self.size if self.full else self.ptr
        idx = torch.randint(0, high, (batch_size,), device=self.data["obs"].device)
        b = {k: v[idx] for k, v in self.data.items()}
        b["discount"] = torch.full_like(b["reward"], gamma)
        if n_step > 1:
            newer = (self.ptr - 1 - idx) % self.size  # rows written after idx
            alive = 1.0 - b["done"]
            for k in range(1, n_step):
                ok = alive * (newer >= k * self.num_envs).float()[:, None]  # episode goes on, data exists
                row = (idx + k * self.num_envs) % self.size
                b["reward"] = b["reward"] + ok * gamma**k * self.data["reward"][row]
                b["discount"] = torch.where(ok > 0, torch.full_like(ok, gamma ** (k + 1)), b["discount"])
                for key in ("next_obs", "next_a_base", "terminated"):
                    b[key] = torch.where(ok > 0, self.data[key][row], b[key])
                alive = ok * (1.0 - self.data["done"][row])
        return b

    def end_episodes(self):
        """Mark each env's newest row as an episode end (done, not terminated: it still bootstraps from its own next
        state). The envs are about to be reset mid-episode (after an evaluation), and no n-step return may run on
        from the old episode into the new one."""
        if self.ptr or self.full:
            rows = (self.ptr - self.num_envs + torch.arange(self.num_envs, device=self.data["done"].device)) % self.size
            self.data["done"][rows] = 1.0

    def state_dict(self):
        """The stored rows in place (a resumed buffer samples the very same transitions) and the write position."""
        high = self.size if self.full else self.ptr
        rows = {k: v[:high].to("cpu", copy=True) for k, v in self.data.items()}  # a slice would save all the storage
        return dict(ptr=self.ptr, full=self.full, data=rows)

    def load_state_dict(self, state):
        n = len(state["data"]["obs"])
        if n == self.size or (n < self.size and not state["full"]):  # same layout
            for k, v in state["data"].items():
                self.data[k][:n] = v.to(self.data[k].device)
            self.ptr, self.full = state["ptr"] % self.size, n == self.size
            return
        order = (torch.arange(n) + (state["ptr"] if state["full"] else 0)) % n  # resized: oldest first
        self.ptr, self.full = 0, False
        self.add(**{k: v[order][-self.size :].to(self.data[k].device) for k, v in state["data"].items()})


# ------------------------------------------------------------------------------------------------------------------
# Dynamics ensemble in the residual's observation space
# ------------------------------------------------------------------------------------------------------------------
class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: (E, N, in) -> (E, N, out)."""

    def __init__(self, ensemble_size, in_dim, out_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_dim))
        nn.init.trunc_normal_(self.weight, std=1 / (2 * math.sqrt(in_dim)))  # MBPO's initialisation

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class DynamicsEnsemble(nn.Module):
    """E probabilistic MLPs: x = [s, a_base, a] -> Gaussian over y = [s' - s, a_base', r], plus a termination logit.

    Inputs and targets are standardised with statistics of the data the models were last fitted on (kept as buffers,
    so they are saved and resumed with the weights). The log-variance is softly bounded (PETS, Chua et al. 2018).
    """

    def __init__(self, ensemble_size, in_dim, out_dim, hidden):
        super().__init__()
        self.ensemble_size, self.out_dim = ensemble_size, out_dim
        dims = [in_dim, hidden, hidden, hidden]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [EnsembleLinear(ensemble_size, a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers, EnsembleLinear(ensemble_size, hidden, 2 * out_dim + 1))
        self.max_logvar = nn.Parameter(torch.full((out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((out_dim,), -10.0))
        for name, dim in (("x_mean", in_dim), ("y_mean", out_dim)):
            self.register_buffer(name, torch.zeros(dim))
        for name, dim in (("x_std", in_dim), ("y_std", out_dim)):
            self.register_buffer(name, torch.ones(dim))

    def fit_scalers(self, x, y):
        # floors: a dim that was constant in the data (a peg size within few episodes) must not blow up new inputs
        self.x_mean.copy_(x.mean(0)), self.x_std.copy_(x.std(0).clamp_min(1e-2))
        self.y_mean.copy_(y.mean(0)), self.y_std.copy_(y.std(0).clamp_min(1e-6))

    def forward(self, x):
        """Standardised prediction: x (N, in) or (E, N, in) -> mean, logvar (E, N, out), termination logit (E, N)."""
        x = (x - self.x_mean) / self.x_std
        if x.dim() == 2:
            x = x.expand(self.ensemble_size, *x.shape)
        h = self.net(x)
        mean, logvar, logit = h[..., : self.out_dim], h[..., self.out_dim : -1], h[..., -1]
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar, logit

    def loss(self, x, y, terminated):
        """Gaussian NLL of the standardised targets + termination BCE, summed over members; and the mean squared
        error of the means (standardised units) for logging."""
        mean, logvar, logit = self(x)
        y = (y - self.y_mean) / self.y_std
        nll = (((mean - y) ** 2) * torch.exp(-logvar) + logvar).mean((1, 2)).sum()
        bce = F.binary_cross_entropy_with_logits(logit, terminated.expand_as(logit), reduction="none").mean(1).sum()
        bound = 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())
        return nll + bce + bound, ((mean - y) ** 2).mean()

    def predict(self, x):
        """Raw-unit predictions of every member: mean, std (E, N, out), termination probability (E, N)."""
        mean, logvar, logit = self(x)
        return mean * self.y_std + self.y_mean, (0.5 * logvar).exp() * self.y_std, logit.sigmoid()


def model_targets(b):
    """(x, y, terminated) for the model from replay data: x = [s, a_base, a], y = [s' - s, a_base', r]."""
    x = torch.cat([b["obs"], b["a_base"], b["action"]], -1)
    y = torch.cat([b["next_obs"] - b["obs"], b["next_a_base"], b["reward"]], -1)
    return x, y, b["terminated"][:, 0]


def disagreement(model, mean, state_dim):
    """The members' std of their predicted next-state change (E, N, .) in units of the state's std, mean over dims."""
    return (mean[..., :state_dim] / model.x_std[:state_dim]).std(0).mean(-1)


def tail_grasp_of_state(state):
    """(N,) bool: whether the fingers hold the peg's tail, read from PegInsertionSide states (N, 43) such as the model
    predicts (the env reads it from contact forces, which the state lacks): fingers closed to within 4 mm of the peg's
    diameter, the TCP within 1 cm of the peg's axis, on its tail half. How often it agrees with the simulator's flag:
    benchmarks/mbrl_model_fit.py (val_grasp_agreement)."""
    peg, tcp = state[:, common.PEG_POSE], state[:, common.TCP_POSE][:, :3]
    tcp_in_peg = common._to_frame(common.quaternion_to_matrix(peg[:, 3:]), peg[:, :3], tcp)
    closed = (state[:, common.QPOS][:, 7:9].sum(-1) - 2 * state[:, common.PEG_HALF_SIZE][:, 1]).abs() < 0.004
    return closed & (tcp_in_peg[:, 0] < 0) & (tcp_in_peg[:, 1:].norm(dim=-1) < 0.01)


def staged_reward_of_state(state, success, cfg):
    """The staged reward (N,) of PegInsertionSide states (N, 43), given success (N,) bool (for imagined steps: the
    predicted termination), the grasp read from the state by tail_grasp_of_state."""
    return sum(common.staged_reward_terms(state, tail_grasp_of_state(state), success, cfg).values())


@torch.no_grad()
def imagine(model, policy, state, a_base, horizon, max_disagreement, scale, reward_fn=None):
    """Branched rollouts of `policy(state, a_base) -> a_res` in the model, from real (state, a_base) of shape (N, .).

    Each step draws the next [s', a_base', r] from one random member per rollout (TS1) and a termination from that
    member's probability; with `reward_fn(s', terminated) -> (N,)` the reward is computed rather than drawn. A step is
    kept only while its rollout is alive and the members agree (their std of the next-state mean in units of the
    state's own std, averaged over dims, <= max_disagreement); a rollout ends at a predicted termination or at the
    first step the members disagree. Returns the kept transitions (ReplayBuffer fields) and statistics.
    """
    n, state_dim = state.shape
    alive = torch.ones(n, dtype=torch.bool, device=state.device)
    rows = torch.arange(n, device=state.device)
    kept, disagreements = [], []
    for _ in range(horizon):
        a_res = policy(state, a_base)
        action = common.compose_action(a_base, a_res, scale)
        mean, std, term_p = model.predict(torch.cat([state, a_base, action], -1))
        k = torch.randint(0, mean.shape[0], (n,), device=state.device)
        y = mean[k, rows] + std[k, rows] * torch.randn_like(mean[0])
        spread = disagreement(model, mean, state_dim)
        terminated = torch.rand(n, device=state.device) < term_p[k, rows]
        next_state, next_a_base, reward = state + y[:, :state_dim], y[:, state_dim:-1].clamp(-1, 1), y[:, -1:]
        if reward_fn is not None:
            reward = reward_fn(next_state, terminated)[:, None]
        keep = alive & (spread <= max_disagreement)
        kept.append(dict(obs=state[keep], a_base=a_base[keep], action=action[keep], reward=reward[keep],
                         next_obs=next_state[keep], next_a_base=next_a_base[keep],
                         terminated=terminated[keep, None].float(), done=terminated[keep, None].float()))
        disagreements.append(spread[alive])
        alive = keep & ~terminated
        state, a_base = next_state, next_a_base
    out = {key: torch.cat([step[key] for step in kept]) for key in kept[0]}
    stats = dict(disagreement=torch.cat(disagreements).mean(), rollout_kept=out["obs"].shape[0] / (n * horizon),
                 rollout_len=out["obs"].shape[0] / n)
    return out, stats


if __name__ == "__main__":

    def main():
        args = tyro.cli(Args)
        # ---- validate and derive ----
        for name in ("num_envs", "num_eval_envs", "num_eval_episodes", "eval_freq", "batch_size", "log_freq",
                     "ensemble_size", "model_train_freq", "model_batch_size", "rollout_batch_size", "rollout_horizon",
                     "model_retain_rounds", "n_step"):
            if getattr(args, name) < 1:
                raise common.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.residual_scale <= 0:
            raise common.ConfigError(f"--residual-scale must be > 0, got {args.residual_scale}")
        if args.total_timesteps < 0 or args.utd < 0 or args.learning_starts < 0 or args.model_updates < 0:
            raise common.ConfigError("--total-timesteps, --utd, --learning-starts and --model-updates must be >= 0")
        if not 0 < args.real_ratio <= 1:
            raise common.ConfigError(f"--real-ratio must be in (0, 1], got {args.real_ratio}")
        if not 0 < args.disagreement_quantile <= 1:
            raise common.ConfigError(f"--disagreement-quantile must be in (0, 1], got {args.disagreement_quantile}")
        if args.model_reward not in ("learned", "staged"):
            raise common.ConfigError(f"--model-reward must be learned or staged, got {args.model_reward}")
        if args.model_reward == "staged" and (args.reward != "staged" or args.env_id != common.ENV_ID):
            raise common.ConfigError(f"--model-reward staged computes the staged reward of {common.ENV_ID}'s state: "
                                     f"it needs --reward staged and --env-id {common.ENV_ID}")
        if not args.reward_lateral >= 0:
            raise common.ConfigError(f"--reward-lateral must be >= 0, got {args.reward_lateral}")
        if args.save_trajectories and not args.evaluate:
            raise common.ConfigError("--save-trajectories needs --evaluate --checkpoint C")
        if args.evaluate and not args.checkpoint:
            raise common.ConfigError("--evaluate needs --checkpoint C")
        if not args.evaluate:  # now, not after the evaluation envs have started
            common.check_num_envs(args.num_envs, args.sim_backend)
        images = common.base_needs_images(args.base)
        ckpt = common.load_checkpoint(args.checkpoint, "mbrl_residual.py", args.base) if args.checkpoint else None
        if ckpt:  # the policy is defined by these: take them from the checkpoint, whatever the command line says
            for name in ARCH_ARGS:
                setattr(args, name, ckpt["args"][name])
            args.reward_lateral = ckpt["args"].get("reward_lateral", 0.0)  # the task it learned
        run_name = ckpt["run_name"] if ckpt and not args.evaluate else f"{args.exp_name}__{args.seed}__{int(time.time())}"

        # ---- seed, device, envs ----
        common.seed_everything(args.seed, args.torch_deterministic)
        if args.threads < 1:
            raise common.ConfigError(f"--threads must be >= 1, got {args.threads}")
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        reward_cfg = common.StagedRewardConfig(d3=args.reward_lateral)
        eval_envs = common.make_env(args.num_eval_envs, args.sim_backend, env_id=args.env_id,
                                    control_mode=args.control_mode, reward=args.reward, reward_cfg=reward_cfg,
                                    images=images, eval_mode=True, seed=args.seed + 10_000,
                                    record_dir=args.save_trajectories,
                                    video_dir=f"runs/{run_name}/videos" if args.capture_video else None,
                                    max_episode_steps=args.max_episode_steps)
        envs = None
        if not args.evaluate:
            envs = common.make_env(args.num_envs, args.sim_backend, env_id=args.env_id,
                                   control_mode=args.control_mode, reward=args.reward, reward_cfg=reward_cfg,
                                   images=images, seed=args.seed,
                                   max_episode_steps=args.max_episode_steps)
        act_dim, state_dim = eval_envs.action_dim, eval_envs.state_dim
        res_dim = state_dim + (common.TASK_FEATURE_DIM if args.task_features else 0)
        obs_dim = res_dim + (act_dim if args.residual_sees_base else 0)
        eval_base = common.make_base_policy(args.base, eval_envs, seed=args.seed)

        # ---- networks ----
        actor = Actor(obs_dim, act_dim, args.hidden_dim, args.init_std).to(device)
        qf1, qf2 = (SoftQNetwork(obs_dim, act_dim, args.hidden_dim, args.layer_norm).to(device) for _ in range(2))
        qf1_target, qf2_target = (SoftQNetwork(obs_dim, act_dim, args.hidden_dim, args.layer_norm).to(device)
                                  for _ in range(2))
        qf1_target.load_state_dict(qf1.state_dict()), qf2_target.load_state_dict(qf2.state_dict())
        q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr)
        actor_params = list(actor.parameters())
        actor_optimizer = torch.optim.Adam(actor_params, lr=args.policy_lr)
        log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=True)
        a_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr)
        obs_rms = common.RunningMeanStd(res_dim, device=device)
        model = DynamicsEnsemble(args.ensemble_size, state_dim + 2 * act_dim, state_dim + act_dim + 1,
                                 args.model_hidden_dim).to(device)
        model_optimizer = torch.optim.Adam(model.parameters(), lr=args.model_lr)

        def rl_obs(state, a_base):
            """s_RL = [normalised (s, task features), a_base] (a_base is already in [-1, 1])."""
            s = obs_rms.normalize(common.residual_state(state, args.task_features))
            return torch.cat([s, a_base], -1) if args.residual_sees_base else s

        def deterministic_residual(obs, a_base):
            with torch.no_grad():
                a_res = actor(rl_obs(obs["state"].to(device), a_base.to(device)))[0].tanh()
            return torch.where(torch.isfinite(a_res), a_res, 0.0).to(a_base.device)

        if ckpt:
            try:
                actor.load_state_dict(ckpt["actor"])
                obs_rms.load_state_dict(ckpt["obs_rms"])
            except (RuntimeError, KeyError) as err:
                raise common.ConfigError(f"{args.checkpoint} does not fit this script's networks: "
                                         f"{str(err).splitlines()[0]}") from None

        if args.evaluate:
            trace = [] if args.save_trajectories else None
            stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes, deterministic_residual,
                                    args.residual_scale, seed=args.seed + 10_000, trace=trace)
            eval_envs.close()  # flushes the recordings
            if args.save_trajectories:
                stats["saved_episodes"] = common.keep_successful_trajectories(
                    args.save_trajectories, trace, args.num_eval_envs, args.residual_scale)
            print(json.dumps({f"eval/{k}": v for k, v in stats.items()}))
            return

        base = common.make_base_policy(args.base, envs, seed=args.seed)
        logger = common.Logger(run_name, args)
        ckpt_path = os.path.join(logger.dir, "ckpt.pt")
        rb = ReplayBuffer(min(args.buffer_size, max(args.total_timesteps, 1)), state_dim, act_dim, args.num_envs,
                          device)
        model_rb = ReplayBuffer(args.rollout_batch_size * args.rollout_horizon * args.model_retain_rounds, state_dim,
                                act_dim, 1, device)
        global_step, num_updates, update_debt, next_model_train = 0, 0, 0.0, args.learning_starts
        eval_base_stats = None
        if ckpt:
            qf1.load_state_dict(ckpt["qf1"]), qf2.load_state_dict(ckpt["qf2"])
            qf1_target.load_state_dict(ckpt["qf1_target"]), qf2_target.load_state_dict(ckpt["qf2_target"])
            q_optimizer.load_state_dict(ckpt["q_optimizer"]), actor_optimizer.load_state_dict(ckpt["actor_optimizer"])
            a_optimizer.load_state_dict(ckpt["a_optimizer"])
            with torch.no_grad():
                log_alpha.copy_(ckpt["log_alpha"])
            try:
                rb.load_state_dict(ckpt["rb"]), model_rb.load_state_dict(ckpt["model_rb"])
            except KeyError as err:  # a buffer without a field this version stores
                raise common.ConfigError(f"{args.checkpoint} is from an older mbrl_residual.py (its replay "
                                         f"buffer has no {err} field): start a new run") from None
            model.load_state_dict(ckpt["model"]), model_optimizer.load_state_dict(ckpt["model_optimizer"])
            next_model_train = ckpt["next_model_train"]
            global_step, num_updates, eval_base_stats = ckpt["global_step"], ckpt["num_updates"], ckpt["eval_base"]
            update_debt = ckpt["update_debt"]
            common.set_rng_state(ckpt["rng"])
            print(f"resumed {args.checkpoint} at step {global_step}")

        # ---- pure update functions (LeanRL style, so --compile can wrap them) ----
        def update_critic(b, alpha):
            with torch.no_grad():
                next_x = rl_obs(b["next_obs"], b["next_a_base"])
                next_res, next_log_pi, _ = actor.get_action(next_x)
                next_action = common.compose_action(b["next_a_base"], next_res, args.residual_scale)
                min_q_next = torch.min(qf1_target(next_x, next_action), qf2_target(next_x, next_action))
                # Bootstrap unless the episode truly ended (success); time-limit truncations do bootstrap.
                soft_v_next = min_q_next - alpha * next_log_pi[:, None]
                target = b["reward"] + (1 - b["terminated"]) * b["discount"] * soft_v_next
            x = rl_obs(b["obs"], b["a_base"])
            q1, q2 = qf1(x, b["action"]), qf2(x, b["action"])  # the critic scores the executed action
            qf1_loss, qf2_loss = F.mse_loss(q1, target), F.mse_loss(q2, target)
            q_optimizer.zero_grad()
            (qf1_loss + qf2_loss).backward()
            q_optimizer.step()
            return torch.stack([q1.mean(), q2.mean(), qf1_loss, qf2_loss]).detach()

        def update_actor(b, alpha):
            x = rl_obs(b["obs"], b["a_base"])
            a_res, log_pi, a_mean = actor.get_action(x)
            action = common.compose_action(b["a_base"], a_res, args.residual_scale)
            actor_loss = (alpha * log_pi - torch.min(qf1(x, action), qf2(x, action))[:, 0]).mean()
            actor_loss = actor_loss + args.residual_l2 * a_mean.pow(2).sum(-1).mean()
            actor_optimizer.zero_grad()
            actor_loss.backward(inputs=actor_params)  # no gradients for the critics' weights
            actor_optimizer.step()
            alpha_loss = -(log_alpha.exp() * (log_pi.detach() + args.target_entropy)).mean()
            if args.autotune:
                a_optimizer.zero_grad()
                alpha_loss.backward()
                a_optimizer.step()
            return torch.stack([actor_loss, alpha_loss]).detach()

        def soft_update():
            with torch.no_grad():
                for net, target in ((qf1, qf1_target), (qf2, qf2_target)):
                    for p, tp in zip(net.parameters(), target.parameters()):
                        tp.lerp_(p, args.tau)

        def policy_step(state, a_base):
            with torch.no_grad():
                a_res, _, _ = actor.get_action(rl_obs(state, a_base))
            # A diverged actor must not send NaN to the simulator; the loss check below stops the run.
            return torch.where(torch.isfinite(a_res), a_res, 0.0)

        def train_model():
            """Fit the ensemble on the real buffer minus its most recent transitions, which measure it instead."""
            high = rb.size if rb.full else rb.ptr
            start = rb.ptr if rb.full else 0  # the oldest transition
            n_val = min(args.holdout, high // 5)
            n_train = high - n_val
            val = {k: v[(start + n_train + torch.arange(n_val, device=device)) % rb.size] for k, v in rb.data.items()}
            train_idx = (start + torch.arange(n_train, device=device)) % rb.size
            model.fit_scalers(*model_targets({k: v[train_idx] for k, v in rb.data.items()})[:2])
            train_loss = torch.zeros((), device=device)
            for _ in range(args.model_updates):
                # each member trains on its own bootstrap batch: the ensemble's spread then reflects what the data
                # does not pin down
                idx = train_idx[torch.randint(0, n_train, (args.ensemble_size, args.model_batch_size), device=device)]
                x, y, term = model_targets({k: v[idx.reshape(-1)] for k, v in rb.data.items()})
                loss, _ = model.loss(x.view(args.ensemble_size, args.model_batch_size, -1),
                                     y.view(args.ensemble_size, args.model_batch_size, -1),
                                     term.view(args.ensemble_size, args.model_batch_size))
                model_optimizer.zero_grad()
                loss.backward()
                model_optimizer.step()
                train_loss += loss.detach() / max(args.model_updates, 1)
            with torch.no_grad():
                x, y, term = model_targets(val)
                val_loss, _ = model.loss(x, y, term)
                members, _, term_p = model.predict(x)
                mean = members.mean(0)
                # per-step prediction error on held-out real transitions: next state (standardised), reward, done
                state_err = (((mean - y)[:, :state_dim] / model.y_std[:state_dim]) ** 2).mean(-1)
                reward_mae = (mean - y)[:, -1].abs().mean()
                term_acc = ((term_p.mean(0) > 0.5).float() == term).float().mean()
                # the cut's calibration: how uncertain the models are where they are measured, and whether their
                # disagreement ranks their errors (Spearman's rank correlation)
                spread = disagreement(model, members, state_dim)
                ranks = [v.argsort().argsort().float() for v in (spread, state_err)]
                ranks = [r - r.mean() for r in ranks]
                corr = (ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()).clamp_min(1e-12)
                cut = torch.quantile(spread, args.disagreement_quantile).clamp(max=args.max_disagreement)
            return dict(train_loss=train_loss, val_loss=val_loss, val_state_mse=state_err.mean(),
                        val_reward_mae=reward_mae, val_term_acc=term_acc, val_disagreement_error_corr=corr,
                        cut_threshold=cut)

        model_reward_fn = None if args.model_reward == "learned" else (
            lambda next_state, success: staged_reward_of_state(next_state, success, reward_cfg))

        def model_round():
            """Retrain the ensemble, then refill the imagined buffer with rollouts branched from real states."""
            t0 = time.perf_counter()
            stats = train_model()
            starts = rb.sample(args.rollout_batch_size)
            imagined, rollout_stats = imagine(model, policy_step, starts["obs"], starts["a_base"],
                                              args.rollout_horizon, stats["cut_threshold"], args.residual_scale,
                                              model_reward_fn)
            if imagined["obs"].shape[0]:
                model_rb.add(**imagined)
            stats.update(rollout_stats, model_buffer=model_rb.size if model_rb.full else model_rb.ptr)
            logger.log({f"model/{k}": float(v) for k, v in stats.items()}, global_step)
            logger.log({"time/model": time.perf_counter() - t0}, global_step)

        def sample_batch(n_step=1):
            """A SAC batch: real_ratio of it real (n-step for the critic), the rest imagined (1-step); all real until
            the model has produced data."""
            n_model = 0 if model_rb.ptr == 0 and not model_rb.full else round(args.batch_size * (1 - args.real_ratio))
            real = rb.sample(args.batch_size - n_model, n_step, args.gamma)
            if n_model == 0:
                return real
            imagined = model_rb.sample(n_model, 1, args.gamma)
            return {k: torch.cat([real[k], imagined[k]]) for k in real}

        if args.compile:
            update_critic, update_actor, policy_step = (torch.compile(f) for f in (update_critic, update_actor,
                                                                                  policy_step))

        def run_eval():
            nonlocal eval_base_stats
            t0 = time.perf_counter()
            if eval_base_stats is None:  # the base alone, once: the line the residual must beat
                eval_base_stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes,
                                                  seed=args.seed + 10_000)
            stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes, deterministic_residual,
                                    args.residual_scale, seed=args.seed + 10_000)
            logger.log({f"eval/{k}": v for k, v in stats.items() if k != "episodes"}, global_step)
            logger.log({f"eval_base/{k}": v for k, v in eval_base_stats.items() if k != "episodes"}, global_step)
            logger.log({"time/eval": time.perf_counter() - t0}, global_step)
            print(f"step {global_step}: eval success_at_end {stats['success_at_end']:.2f} (base alone "
                  f"{eval_base_stats['success_at_end']:.2f}), success_once {stats['success_once']:.2f}, "
                  f"return {stats['return']:.2f} over {stats['episodes']} episodes")

        def restart_envs():
            """Reset every train env with a seed derived from the step: a checkpoint taken here resumes exactly."""
            rb.end_episodes()
            obs = envs.reset(seed=args.seed + global_step, reconfigure=True)
            base.reset(torch.ones(args.num_envs, dtype=torch.bool, device=envs.device), seed=args.seed + global_step)
            return obs, base(obs).to(device)

        def save():
            params = [p for net in (actor, qf1, qf2, model) for p in net.parameters()]
            if not torch.isfinite(losses).all() or not all(torch.isfinite(p).all() for p in params):
                raise FloatingPointError(f"non-finite loss or weights at step {global_step}")
            if args.save_model:
                common.save_checkpoint(ckpt_path, dict(
                    script="mbrl_residual.py", base=args.base, args=vars(args), run_name=run_name,
                    actor=actor.state_dict(), qf1=qf1.state_dict(), qf2=qf2.state_dict(),
                    qf1_target=qf1_target.state_dict(), qf2_target=qf2_target.state_dict(),
                    q_optimizer=q_optimizer.state_dict(), actor_optimizer=actor_optimizer.state_dict(),
                    a_optimizer=a_optimizer.state_dict(), log_alpha=log_alpha.detach().cpu(),
                    obs_rms=obs_rms.state_dict(), rb=rb.state_dict(), model=model.state_dict(),
                    model_optimizer=model_optimizer.state_dict(), model_rb=model_rb.state_dict(),
                    next_model_train=next_model_train, global_step=global_step,
                    num_updates=num_updates, update_debt=update_debt, eval_base=eval_base_stats,
                    rng=common.rng_state(),
                ))

        # ---- training loop ----
        obs, a_base = restart_envs()
        if ckpt is None:
            run_eval()
        env_device = envs.device
        ep_sums = torch.zeros(5, device=device)  # finished episodes: count, return, len, success_once, success_at_end
        term_sums = torch.zeros(len(common.REWARD_TERMS), device=device)
        norm_sums = torch.zeros(3, device=device)  # |a_base|, |scale * a_res|, fraction of steps with the residual on
        losses = torch.zeros(6, device=device)
        loss_count = 0
        t_start, steps_at_start = time.perf_counter(), global_step
        t_rollout = t_update = 0.0
        sim_time_at_start = envs.sim_time
        next_eval = (global_step // args.eval_freq + 1) * args.eval_freq
        next_log = global_step + args.log_freq
        # Ctrl-C asks the loop to stop at the end of the current step, where a checkpoint can resume exactly;
        # a second Ctrl-C interrupts at once.
        stop_requested = []
        signal.signal(signal.SIGINT, lambda *_: (stop_requested.append(True),
                                                 signal.signal(signal.SIGINT, signal.default_int_handler)))
        try:
            while global_step < args.total_timesteps:
                t0 = time.perf_counter()
                state = obs["state"].to(device)
                # buffer states are normalised at sample time, so stored data never goes stale
                obs_rms.update(common.residual_state(state, args.task_features))
                if global_step < args.learning_starts:
                    a_res = torch.zeros_like(a_base)  # base-only rollouts: the critic's warm-up data
                else:
                    a_res = policy_step(state, a_base)
                    if args.progressive_steps > 0:  # Policy Decorator's progressive exploration schedule
                        p = min((global_step - args.learning_starts) / args.progressive_steps, 1.0)
                        a_res = a_res * (torch.rand(args.num_envs, 1, device=device) < p)
                action = common.compose_action(a_base, a_res, args.residual_scale)
                next_obs, reward, terminated, truncated, info = envs.step(action.to(env_device))
                done = terminated | truncated
                base.reset(done)
                next_a_base = base(next_obs).to(device)  # also the base action of the next iteration
                done = done.to(device)
                # Bootstrap input [s', a_base']: at an episode end the base is not queried on the terminal state (a
                # chunked VLA would spend a query on a state it never acts from): a_base stands in for a_base'.
                rb.add(obs=state, a_base=a_base, action=action, reward=reward.to(device),
                       next_obs=info["final_obs"]["state"].to(device),
                       next_a_base=torch.where(done[:, None], a_base, next_a_base), terminated=terminated.to(device),
                       done=done)
                obs, a_base = next_obs, next_a_base
                global_step += args.num_envs
                t_rollout += time.perf_counter() - t0

                # bookkeeping stays on the device: no .item() in the loop
                d, ep = done.float(), info["episode"]
                ep_sums += torch.stack([d.sum()] + [(ep[k].to(device).float() * d).sum() for k in EPISODE_KEYS])
                if args.reward == "staged":
                    term_sums += torch.stack([info[f"reward/{k}"].to(device).sum() for k in common.REWARD_TERMS])
                norm_sums += torch.stack([a_base.norm(dim=-1).sum(), (args.residual_scale * a_res).norm(dim=-1).sum(),
                                          (a_res != 0).any(-1).float().sum()])

                # ---- updates ----
                t0 = time.perf_counter()
                if global_step >= args.learning_starts:
                    if global_step >= next_model_train:
                        next_model_train += args.model_train_freq
                        model_round()
                    if num_updates == 0:  # critic warm-up before the actor acts or learns
                        for _ in range(args.critic_warmup_updates):
                            update_critic(rb.sample(args.batch_size, args.n_step, args.gamma), log_alpha.exp().detach())
                            soft_update()
                    update_debt += args.utd * args.num_envs
                    while update_debt >= 1:
                        update_debt -= 1
                        alpha = log_alpha.exp().detach()
                        q_stats = update_critic(sample_batch(args.n_step), alpha)
                        a_stats = torch.zeros(2, device=device)
                        if num_updates % args.policy_frequency == 0:
                            a_stats = update_actor(sample_batch(), alpha)
                        if num_updates % args.target_network_frequency == 0:
                            soft_update()
                        num_updates += 1
                        losses += torch.cat([q_stats, a_stats])
                        loss_count += 1
                t_update += time.perf_counter() - t0

                # ---- logging ----
                if global_step >= next_log:
                    next_log += args.log_freq
                    n, *ep_means = ep_sums.tolist()
                    logs = {f"train/{k}": v / n for k, v in zip(EPISODE_KEYS, ep_means)} if n > 0 else {}
                    steps = args.log_freq
                    if args.reward == "staged":
                        logs.update({f"reward/{k}": v / steps for k, v in zip(common.REWARD_TERMS, term_sums.tolist())})
                    nb, nr, on = (norm_sums / steps).tolist()
                    logs.update({"residual/base_action_norm": nb, "residual/residual_action_norm": nr,
                                 "residual/residual_active": on})
                    if loss_count:
                        l = (losses / loss_count).tolist()
                        if not all(math.isfinite(v) for v in l):
                            raise FloatingPointError(f"non-finite loss at step {global_step}")
                        logs.update({"losses/qf1_value": l[0], "losses/qf2_value": l[1], "losses/qf1_loss": l[2],
                                     "losses/qf2_loss": l[3], "losses/qf_loss": (l[2] + l[3]) / 2,
                                     "losses/actor_loss": l[4], "losses/alpha_loss": l[5]})
                    sps = (global_step - steps_at_start) / (time.perf_counter() - t_start)
                    alpha = log_alpha.exp().item()
                    # Throughput as a ratio within this run: training steps/s over the env's own steps/s.
                    t_env = envs.sim_time - sim_time_at_start
                    env_sps = (global_step - steps_at_start) / t_env
                    logs.update({"losses/alpha": alpha, "charts/SPS": sps, "charts/env_SPS": env_sps,
                                 "charts/SPS_over_env_SPS": sps / env_sps, "charts/learning_rate": args.q_lr,
                                 "time/rollout": t_rollout, "time/update": t_update, "time/env": t_env})
                    logger.log(logs, global_step)
                    print(f"step {global_step}/{args.total_timesteps} | SPS {sps:.0f} ({sps / env_sps:.2f} of env) | "
                          f"train success_once "
                          f"{logs.get('train/success_once', float('nan')):.2f} return "
                          f"{logs.get('train/return', float('nan')):.2f} | |a_res| {nr:.3f} | alpha {alpha:.3f}",
                          flush=True)
                    ep_sums.zero_(), term_sums.zero_(), norm_sums.zero_(), losses.zero_()
                    loss_count = 0

                if global_step >= next_eval or global_step >= args.total_timesteps:
                    next_eval += args.eval_freq
                    t0 = time.perf_counter()
                    run_eval()
                    obs, a_base = restart_envs()
                    save()
                    t_start += time.perf_counter() - t0  # SPS counts training time only
                if stop_requested:
                    print(f"interrupted at step {global_step}: saving {ckpt_path}", file=sys.stderr)
                    restart_envs()
                    save()
                    sys.exit(130)
        except FloatingPointError as err:
            print(f"error: {err}; stopping, the last good checkpoint is {ckpt_path}", file=sys.stderr)
            sys.exit(1)
        finally:
            envs.close()
            eval_envs.close()
            logger.close()

    common.exit_on_config_error(main)
