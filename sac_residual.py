"""Residual SAC: a small off-policy RL policy learns a bounded correction on top of a frozen base policy.

    a_t = clip(a_base + scale * a_res),  a_res ~ pi_RL(. | [s_t, a_base]),  a_base = M_phi(v_theta(s_t, c))  (eq. 1)

Choices from the residual-RL literature (Policy Decorator, RPL, ResiP, DAWN, RLPD), each a flag: the residual is
bounded (scale * tanh) and starts at exactly zero; the critic scores the executed action a_base + a_res; it is warmed
up on base-only rollouts before the actor acts, then the residual is switched on progressively; an L2 pull of the
residual towards zero; LayerNorm critics; an update-to-data knob; n-step returns. The residual also observes the
peg head's offset from the hole (common.task_features). On the CPU back end the updates run while the env workers
simulate (step_async / step_wait). Resume is exact: checkpoints are taken where every env restarts from a seed derived
from the step.

    python sac_residual.py                                   # CPU, 2 envs, the offline `coarse` base
    python sac_residual.py --num-envs 512 --utd 0.0625       # GPU
    python sac_residual.py --evaluate --checkpoint runs/<run>/ckpt.pt

Logged: train/{return,episode_len,success_once,success_at_end}, eval/{same}, eval_base/{same} (the base alone,
measured once, repeated at every eval), eval_raw/{same} (with --eval-ema: the actor itself),
reward/{grasp,orient,insert,success,stage}, losses/{qf1_value,qf2_value,qf1_loss,qf2_loss (the first two critics),
qf_loss (mean over the critics),actor_loss,alpha,alpha_loss,residual_l2},
residual/{base_action_norm,residual_action_norm,residual_active}, charts/{SPS,env_SPS,SPS_over_env_SPS,learning_rate},
time/{rollout,env,update,eval}.
"""

import copy
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
    exp_name: str = "sac_residual"
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
    4 mm of aim error costs 0.004 per step, less than the critics' targets scatter (benchmarks/actor_drift.py); at 10 it
    costs 0.04. Measured on `coarse` (seeds 1, 3): 0.64 and 0.70 success at 50k env steps against 0.42 and 0.50 with 0,
    the level 0 reaches at 200k (RESULTS.md)"""
    total_timesteps: int = 200_000
    """total env steps"""
    max_episode_steps: Optional[int] = None
    """episode length of the training and eval envs (None: the task's, 100 steps for PegInsertionSide-v1);
    shorter only for quick runs and tests: success_at_end is defined at the task's limit"""

    # base policy and residual
    base: str = "coarse"
    """the frozen base: pi0:<hub id or folder>, expert, coarse[:key=value,...] or zero"""
    residual_scale: float = 0.1
    """bound of the residual in action units: a = clip(a_base + scale * tanh(.)) (Policy Decorator's alpha); 0.1 is
    enough to hold the coarse base 14 mm off its hole estimate (its lateral pull is about error / 0.014 m). Wider
    bounds raise the ceiling (an expert-imitating residual: 0.91 at 0.1, 0.98 at 0.2) but broke the base while the
    critic was young: 0.2 and 0.3 fell to 0.02-0.28 success at 25k steps in 5 of 5 runs; 0.2 with --residual-l2 0.4
    (the same pull per action unit) held it, then learned no faster than 0.1 (RESULTS.md)"""
    residual_sees_base: bool = True
    """whether the residual observes [s, a_base] (paper 2.1) rather than s alone (RPL's finding)"""
    task_features: bool = True
    """whether the residual also observes common.task_features(s): the head's offset from the hole axis, depth, tilt"""
    residual_dims: Optional[tuple[int, ...]] = None
    """the action dimensions the residual may change (None: all); e.g. `0 1 2`, the translation of pd_ee_delta_pose:
    the coarse base's error is a lateral offset, and a hand-written lateral correction on those three alone reaches
    0.84 (benchmarks/oracle_residual.py). Fewer dimensions: less for the critic to rank, no entropy or L2 spent on
    the others. Measured on `coarse` (seeds 1, 3): level with all dimensions on average (mean success over 25k-200k
    and both seeds 0.52 either way), lower at 200k (0.56, 0.60 against 0.64, 0.70): the lateral ceiling is below the
    0.9 target, so all stay the default (RESULTS.md)"""

    # algorithm
    gamma: float = 0.8
    """the discount factor (100-step episodes, and success ends the episode). 0.8 is ManiSkill's SAC default; with
    5-step returns a target bootstraps at 0.8^5 = 0.33 of the next value, so less of the episode's random future
    scatters the targets, while what a residual does to the aim is felt within a few steps (the lateral term charges
    it). Measured on `coarse` with the lateral term, seeds 1-4: behind 0.95 early (means 0.58 against 0.64 at 50k),
    ahead from 125k (0.825 against 0.76 at 200k; 0.76, 0.88, 0.84, 0.82 against 0.80, 0.78, 0.74, 0.72) (RESULTS.md)"""
    n_step: int = 5
    """n-step returns for the critic's target (1: plain TD). Success comes a few steps after the lateral correction
    that causes it; n steps carry it back n times faster, at the price of the behaviour policy's bias. Measured,
    10 was level with 5 over 100k steps (seed 1, RESULTS.md), so 5 stays"""
    tau: float = 0.01
    """target smoothing coefficient"""
    batch_size: int = 256
    """the batch size of each update"""
    buffer_size: int = 1_000_000
    """the replay memory size, in env steps (transitions)"""
    learning_starts: int = 5_000
    """env steps of base-only rollouts before any update: the critic's warm-up data (DAWN)"""
    critic_warmup_updates: int = 2_000
    """critic-only updates on that data before the actor starts learning (RPL's burn-in, DAWN's warm-up)"""
    progressive_steps: int = 20_000
    """after the warm-up the residual acts in each env-step with probability min(t / this, 1) (Policy Decorator)"""
    utd: float = 0.5
    """update-to-data ratio: gradient updates per env step"""
    policy_lr: float = 3e-4
    """the learning rate of the actor"""
    q_lr: float = 3e-4
    """the learning rate of the critics"""
    policy_frequency: int = 1
    """actor (and alpha) updates every this many critic updates"""
    target_network_frequency: int = 1
    """target network updates every this many critic updates"""
    alpha: float = 0.001
    """entropy coefficient (initial value when autotuned): per-step rewards are O(0.1), so an entropy bonus of
    alpha * log_pi (about 10 nats here) must stay far below them"""
    autotune: bool = False
    """whether to tune alpha towards target_entropy; in our 40k-step probes autotuning drove alpha to ~0 and the
    residual drifted to saturation, undoing the base (success 0.38 -> 0.00-0.26), while a fixed small alpha held"""
    target_entropy: float = -7.0
    """the entropy target (per action; -action_dim is the usual choice)"""
    residual_l2: float = 0.1
    """weight of an L2 penalty on the residual's (tanh) mean action in the actor loss: stay on the base unless the
    critic is sure. Measured on `coarse` with task features: 1.0 held the base and learned nothing in 50k steps (the
    needed correction is near the bound, and 1.0 per dimension outweighs the critic's gain); 0.01 let the residual
    undo the base (0.38 -> 0.10 at 25k) (benchmarks/results/logs/sac_residual_probe_l2_*.log); 0.1 with --n-step 5
    learned (benchmarks/results/sac_residual_curve.json)"""
    residual_l2_final: Optional[float] = None
    """if set, the L2 weight moves linearly from --residual-l2 to this over --residual-l2-decay-steps env steps after
    --learning-starts: hold the base while the critic is young, loosen once it has learned where the gain is.
    Measured on `coarse`, 0.1 -> 0.01 over 100k steps collapsed (0.06 and 0.00 at 100k, seeds 1 and 3; RESULTS.md), so
    it is off"""
    residual_l2_decay_steps: int = 100_000
    """env steps over which --residual-l2 moves to --residual-l2-final"""
    eval_ema: float = 0.0
    """also evaluate a Polyak average of the actor (0: off): after every actor update the average moves towards the
    actor by 1 - this decay (0.9998: about the last 5,000 updates, 10k env steps at the defaults). Evaluations then
    log the average as eval/* and the actor itself as eval_raw/* (paired: same runs, same episodes), and `--evaluate`
    of the checkpoint uses the average. It steadied demo_explore_sac.py's evaluations; here, from `coarse`, it was
    level with the actor over 200k steps (seeds 1 and 3, RESULTS.md), so it is off"""
    init_std: float = 0.2
    """initial std of the residual's pre-tanh Gaussian: small exploration around the base"""
    noise_beta: float = 0.0
    """colour of the training rollouts' exploration noise: the policy's Gaussian noise is drawn per episode as a
    sequence with power spectrum 1/f^beta over the episode's steps (0: white, independent per step, plain SAC; 1: pink,
    Eberhard et al. 2023, "Pink noise is all you need"; 2: red, near noise held for the episode). Each step's noise is
    still a (near-)unit Gaussian, so the policy, its log-probability and the updates are unchanged: only the behaviour's
    exploration over time is. The correction this task needs is a lateral push kept up for tens of steps, which white
    noise averages away; yet measured on `coarse` (seeds 1, 3, 200k) pink noise stayed near the base (0.36, 0.42 at
    200k against white noise's 0.64, 0.70; training episodes succeeded less often), so it is off (RESULTS.md)"""
    num_q: int = 2
    """critics in the ensemble (2: clipped double Q, the SAC default). With more, each target is the min over a random
    --num-q-target of them (REDQ, RLPD) and the actor maximises the min over all of them: a lower confidence bound
    that falls where the critics disagree, i.e. on actions the data have not tried. The L2 pull holds the residual
    near the base everywhere; pessimism holds it only where the critics are unsure. Measured on `coarse`, seed 1: 5
    critics were level with 2 over 100k steps (0.54 at 100k), and with a 10x weaker pull they did not stop the residual
    from undoing the base (0.04 at 25k): each critic's value moves less over the whole residual box than the critics
    differ from each other (benchmarks/actor_drift.py), so their min hardly ranks actions. 2 stays (RESULTS.md)"""
    num_q_target: int = 2
    """the random subset of critics whose min is the bootstrap target (REDQ's M; all of them when >= --num-q)"""
    residual_hold: int = 1
    """the residual is chosen every this many steps of an episode and held in between: one decision (a macro-action)
    instead of k. The critics then score decisions only: each transition starts at a decision step, and with
    --n-step a multiple of this its target bootstraps at a later decision (--residual-hold 5 --n-step 5: the
    semi-MDP's one-step target over the 5 steps the decision acts). The aim: a decision moves the return k times
    as much as one step's residual does, against target noise that does not grow with k (benchmarks/actor_drift.py
    measured the critics' value moving less over the whole residual box than their targets scatter), and its
    exploration noise is held too. The base still acts at every step; evaluation holds the residual as training
    does. Measured on `coarse`, seed 1: the critics' value range over the residual box did rise above their target
    error, the actor moved twice as far, and success fell below the base (5: 0.28 at 100k; 10: 0.26 at 50k; base
    0.38); with the pull raised to keep the actor near the base (--residual-l2 0.2), 0.34 at 100k, the base's level
    (the default: 0.50-0.56). So it is off (RESULTS.md)"""
    layer_norm: bool = True
    """whether the critics use LayerNorm (RLPD, DAWN: stabler values at high update ratios)"""
    critic_sees_residual: bool = False
    """whether the critics also read the executed residual in its own units, (a - a_base) / --residual-scale, besides
    the executed action a: within a bound of 0.1 the residual moves the action input by at most 0.1 while the base
    moves it across [-1, 1], so the critic's first layer sees the decision at a tenth of the scale of everything else
    (its input is otherwise normalised). Needs --residual-sees-base (a_base is read from the critic's input).
    Measured on `coarse` (seeds 1, 3): the critics' value then varied 4-5x more with the action than their targets
    scatter, the actor followed it to 0.2 of the bound everywhere, and success fell to 0.18-0.22 (bases 0.38, 0.34);
    with --residual-l2 0.5 the actor stayed near the base and success at its level (0.30 at 100k, seed 1; the
    default: 0.50-0.56). So it is off (RESULTS.md)"""
    hidden_dim: int = 256
    """width of the actor and critic MLPs"""

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
    """Q(x, a) of the executed action a. With `residual_scale` set (--critic-sees-residual) it also reads the
    executed residual in its own units, (a - a_base) / scale, a_base being the last act_dim entries of x."""

    def __init__(self, obs_dim, act_dim, hidden, layer_norm, residual_scale=None):
        super().__init__()
        self.act_dim, self.residual_scale = act_dim, residual_scale
        self.net = mlp(obs_dim + act_dim * (1 if residual_scale is None else 2), 1, hidden, layer_norm)

    def forward(self, x, a):
        if self.residual_scale is None:
            return self.net(torch.cat([x, a], -1))
        return self.net(torch.cat([x, a, (a - x[..., -self.act_dim :]) / self.residual_scale], -1))


LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0
EPISODE_KEYS = ("return", "episode_len", "success_once", "success_at_end")
ARCH_ARGS = ("env_id", "control_mode", "residual_scale", "residual_sees_base", "task_features",
             "hidden_dim", "layer_norm", "residual_dims", "critic_sees_residual")


class Actor(nn.Module):
    """Tanh-Gaussian residual. The mean head starts at exactly zero, so the untrained residual is the base itself.
    It acts on `dims` of the action only (all by default); `expand` puts zeros on the others."""

    def __init__(self, obs_dim, act_dim, hidden, init_std, dims=None):
        super().__init__()
        self.act_dim = act_dim
        self.register_buffer("dims", torch.arange(act_dim) if dims is None else torch.tensor(dims), persistent=False)
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, len(self.dims))
        self.log_std = nn.Linear(hidden, len(self.dims))
        nn.init.zeros_(self.mean.weight), nn.init.zeros_(self.mean.bias)
        nn.init.zeros_(self.log_std.weight), nn.init.constant_(self.log_std.bias, math.log(init_std))

    def forward(self, x):
        h = self.trunk(x)
        return self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def get_action(self, x, eps=None):
        """A sampled residual, its log-probability and the deterministic one; `eps`: the unit Gaussian noise to use
        (coloured noise of the training rollouts), fresh white noise by default."""
        mean, log_std = self(x)
        std = log_std.exp()
        x_t = mean + std * (torch.randn_like(mean) if eps is None else eps)  # reparameterisation
        y_t = torch.tanh(x_t)
        log_prob = (-0.5 * ((x_t - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - torch.log(1 - y_t.pow(2) + 1e-6).sum(-1)
        return self.expand(y_t), log_prob, self.expand(torch.tanh(mean))

    def expand(self, y):
        """(..., len(dims)) -> (..., act_dim), zero on the dimensions the residual leaves alone."""
        if len(self.dims) == self.act_dim:
            return y
        return y.new_zeros(*y.shape[:-1], self.act_dim).index_copy(y.dim() - 1, self.dims, y)


def colored_noise(beta, shape, length, device=None, generator=None):
    """Gaussian sequences of shape (*shape, length) whose power spectrum along the last axis goes as 1/f^beta, of
    about unit variance (1.05 for pink, 1.15 for red over 100 steps, as the library normalises them): the algorithm of
    colorednoise.powerlaw_psd_gaussian (Timmer and Koenig 1995; the pink-noise paper's generator) in torch, so the
    noise is made on the training device from the torch RNG that checkpoints save (no numpy in the loop)."""
    f = torch.fft.rfftfreq(length, device=device)
    f[0] = 1.0 / length  # the lowest frequency resolved: no infinite power at f = 0
    amp = f.pow(-beta / 2)
    w = amp[1:].clone()
    w[-1] *= (1 + length % 2) / 2
    sigma = 2 * w.pow(2).sum().sqrt() / length  # the std the sequences would have: divided out
    re = torch.randn(*shape, len(f), device=device, generator=generator) * amp
    im = torch.randn(*shape, len(f), device=device, generator=generator) * amp
    im[..., 0] = 0.0  # a real signal's mean (and Nyquist) components are real
    re[..., 0] *= math.sqrt(2)
    if length % 2 == 0:
        im[..., -1] = 0.0
        re[..., -1] *= math.sqrt(2)
    return torch.fft.irfft(torch.complex(re, im), n=length) / sigma


class HeldResidual:
    """An evaluation residual chosen at every `hold`-th step of each episode and held in between (--residual-hold),
    for common.evaluate, which calls `reset(mask)` where episodes end."""

    def __init__(self, residual, hold):
        self.residual, self.hold, self.t, self.held = residual, hold, None, None

    def reset(self, mask):
        self.t = torch.zeros(len(mask), dtype=torch.long, device=mask.device) if self.t is None else self.t * ~mask

    def __call__(self, obs, a_base):
        a_res = self.residual(obs, a_base)
        if self.held is not None:
            a_res = torch.where((self.t % self.hold == 0).to(a_res.device)[:, None], a_res, self.held)
        self.held, self.t = a_res, self.t + 1
        return a_res


# ------------------------------------------------------------------------------------------------------------------
# Replay buffer on the training device
# ------------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """States with their task features (normalised at sample time, so stored data never goes stale), base actions
    and executed actions.

    Rows are added one env step at a time, `num_envs` rows per step, so env i's next step sits `num_envs` rows later:
    `sample(..., n_step)` walks that far to build n-step returns (the size is a multiple of num_envs, so wrapping
    keeps the pattern). `phase` is the step's place in its held residual's window (--residual-hold; 0: a decision).
    """

    FIELDS = ("obs", "a_base", "action", "reward", "next_obs", "next_a_base", "terminated", "done", "phase")

    def __init__(self, size, state_dim, act_dim, num_envs, device):
        dims = dict(obs=state_dim, a_base=act_dim, action=act_dim, reward=1, next_obs=state_dim,
                    next_a_base=act_dim, terminated=1, done=1, phase=1)
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

    def sample(self, batch_size, n_step=1, gamma=1.0, hold=1):
        """A batch of transitions; with n_step > 1 each is an n-step one: `reward` is the discounted sum of up to
        n rewards of the same env, stopping at an episode end or at the newest data, `next_*` and `terminated` are
        those of its last step, and `discount` is gamma ** (steps summed) (uncorrected n-step returns, as in
        Rainbow and DrQ-v2: fine for a residual that stays near the policy that collected the data). With hold > 1
        every transition starts at a decision (phase 0), each decision drawn in proportion to the steps it held."""
        high = self.size if self.full else self.ptr
        dev = self.data["obs"].device
        idx = torch.randint(0, high, (batch_size,), device=dev)
        if hold > 1:
            idx = self.decision_rows(idx, hold)
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

    def decision_rows(self, idx, hold):
        """The row of the decision whose held residual row `idx` executed: `phase` steps back in the same env. Where
        that row has been overwritten (the oldest rows of a full buffer), the env's next decision instead: the first
        of the next hold - 1 rows of the env with phase 0 (its window ends there, or its episode did)."""
        high = self.size if self.full else self.ptr
        phase = self.data["phase"][idx, 0].long()
        back = (idx - phase * self.num_envs) % self.size
        kept = (self.ptr - 1 - idx) % self.size + phase * self.num_envs < high
        ahead = (idx[:, None] + torch.arange(1, hold, device=idx.device) * self.num_envs) % self.size
        first = (self.data["phase"][ahead, 0] == 0).float().argmax(1) + 1
        return torch.where(kept, back, (idx + first * self.num_envs) % self.size)

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
        if "phase" not in state["data"]:  # written before --residual-hold: every step was a decision
            state = dict(state, data=dict(state["data"], phase=torch.zeros(n, 1)))
        if n == self.size or (n < self.size and not state["full"]):  # same layout
            for k, v in state["data"].items():
                self.data[k][:n] = v.to(self.data[k].device)
            self.ptr, self.full = state["ptr"] % self.size, n == self.size
            return
        order = (torch.arange(n) + (state["ptr"] if state["full"] else 0)) % n  # resized: oldest first
        self.ptr, self.full = 0, False
        self.add(**{k: v[order][-self.size :].to(self.data[k].device) for k, v in state["data"].items()})


if __name__ == "__main__":

    def main():
        args = tyro.cli(Args)
        # ---- validate and derive ----
        for name in ("num_envs", "num_eval_envs", "num_eval_episodes", "eval_freq", "batch_size", "log_freq",
                     "n_step", "residual_l2_decay_steps"):
            if getattr(args, name) < 1:
                raise common.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.residual_scale <= 0:
            raise common.ConfigError(f"--residual-scale must be > 0, got {args.residual_scale}")
        if args.total_timesteps < 0 or args.utd < 0 or args.learning_starts < 0:
            raise common.ConfigError("--total-timesteps, --utd and --learning-starts must be >= 0")
        if args.residual_l2 < 0 or (args.residual_l2_final is not None and args.residual_l2_final < 0):
            raise common.ConfigError("--residual-l2 and --residual-l2-final must be >= 0")
        if args.num_q < 2 or args.num_q_target < 1:
            raise common.ConfigError(f"--num-q must be >= 2 and --num-q-target >= 1, got {args.num_q} and "
                                     f"{args.num_q_target}")
        if args.critic_sees_residual and not args.residual_sees_base:
            raise common.ConfigError("--critic-sees-residual needs --residual-sees-base (the critics read a_base "
                                     "there)")
        if args.residual_hold < 1:
            raise common.ConfigError(f"--residual-hold must be >= 1, got {args.residual_hold}")
        if not args.noise_beta >= 0:
            raise common.ConfigError(f"--noise-beta must be >= 0 (0: white noise, 1: pink), got {args.noise_beta}")
        if not 0 <= args.eval_ema < 1:
            raise common.ConfigError(f"--eval-ema must be in [0, 1) (a decay per actor update), got {args.eval_ema}")
        if not args.reward_lateral >= 0:
            raise common.ConfigError(f"--reward-lateral must be >= 0, got {args.reward_lateral}")
        if args.save_trajectories and not args.evaluate:
            raise common.ConfigError("--save-trajectories needs --evaluate --checkpoint C")
        if args.evaluate and not args.checkpoint:
            raise common.ConfigError("--evaluate needs --checkpoint C")
        if not args.evaluate:  # now, not after the evaluation envs have started
            common.check_num_envs(args.num_envs, args.sim_backend)
        images = common.base_needs_images(args.base)
        ckpt = common.load_checkpoint(args.checkpoint, "sac_residual.py", args.base) if args.checkpoint else None
        if ckpt:  # the policy is defined by these: take them from the checkpoint, whatever the command line says
            for name in ARCH_ARGS:
                setattr(args, name, ckpt["args"].get(name))  # residual_dims: None in checkpoints older than it
            args.critic_sees_residual = bool(args.critic_sees_residual)  # and False for this one
            args.eval_ema = ckpt["args"].get("eval_ema", 0.0)  # evaluate what the run evaluated; resume exactly
            args.num_q = ckpt["args"].get("num_q", 2)  # the critics in the checkpoint
            args.residual_hold = ckpt["args"].get("residual_hold", 1)  # how its residual acts
            args.reward_lateral = ckpt["args"].get("reward_lateral", 0.0)  # the task it learned
        if args.n_step % args.residual_hold and not args.evaluate:
            raise common.ConfigError(f"--n-step must be a multiple of --residual-hold (targets bootstrap at a "
                                     f"decision), got {args.n_step} and {args.residual_hold}")
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
                                   images=images, seed=args.seed, max_episode_steps=args.max_episode_steps)
        act_dim, state_dim = eval_envs.action_dim, eval_envs.state_dim
        res_dim = state_dim + (common.TASK_FEATURE_DIM if args.task_features else 0)
        obs_dim = res_dim + (act_dim if args.residual_sees_base else 0)
        eval_base = common.make_base_policy(args.base, eval_envs, seed=args.seed)
        if args.residual_dims is not None and (not args.residual_dims or len(set(args.residual_dims)) < len(
                args.residual_dims) or not all(0 <= d < act_dim for d in args.residual_dims)):
            raise common.ConfigError(f"--residual-dims must be distinct action dimensions in [0, {act_dim}), got "
                                     f"{' '.join(map(str, args.residual_dims))}")

        # ---- networks ----
        actor = Actor(obs_dim, act_dim, args.hidden_dim, args.init_std, args.residual_dims).to(device)
        critic_scale = args.residual_scale if args.critic_sees_residual else None
        qfs, qfs_target = (nn.ModuleList(SoftQNetwork(obs_dim, act_dim, args.hidden_dim, args.layer_norm, critic_scale)
                                         for _ in range(args.num_q)).to(device) for _ in range(2))
        qfs_target.load_state_dict(qfs.state_dict())
        online_params, target_params = list(qfs.parameters()), list(qfs_target.parameters())  # loaded in place
        q_optimizer = torch.optim.Adam(online_params, lr=args.q_lr, foreach=True)
        actor_params = list(actor.parameters())
        # the averaged actor for evaluation (--eval-ema): it starts at the untrained actor, i.e. at the base
        actor_ema = copy.deepcopy(actor).requires_grad_(False) if args.eval_ema > 0 else None
        ema_params = [] if actor_ema is None else list(actor_ema.parameters())
        actor_optimizer = torch.optim.Adam(actor_params, lr=args.policy_lr, foreach=True)
        log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=True)
        a_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr)
        obs_rms = common.RunningMeanStd(res_dim, device=device)

        def rl_obs(res_state, a_base):
            """s_RL = [normalised (s, task features), a_base] (a_base is already in [-1, 1])."""
            s = obs_rms.normalize(res_state)
            return torch.cat([s, a_base], -1) if args.residual_sees_base else s

        def deterministic_residual(obs, a_base, policy=None):
            """The evaluated residual: the mean of the averaged actor with --eval-ema, of the actor without."""
            if policy is None:
                policy = actor if actor_ema is None else actor_ema
            with torch.no_grad():
                res_state = common.residual_state(obs["state"].to(device), args.task_features)
                a_res = policy.expand(policy(rl_obs(res_state, a_base.to(device)))[0].tanh())
            return torch.where(torch.isfinite(a_res), a_res, 0.0).to(a_base.device)

        def eval_residual(policy=None):
            """deterministic_residual for common.evaluate, held for --residual-hold steps as in training."""
            residual = lambda obs, a_base: deterministic_residual(obs, a_base, policy)  # noqa: E731
            return residual if args.residual_hold == 1 else HeldResidual(residual, args.residual_hold)

        if ckpt:
            try:
                actor.load_state_dict(ckpt["actor"])
                obs_rms.load_state_dict(ckpt["obs_rms"])
                if actor_ema is not None:
                    actor_ema.load_state_dict(ckpt["actor_ema"])
            except (RuntimeError, KeyError) as err:
                raise common.ConfigError(f"{args.checkpoint} does not fit this script's networks: "
                                         f"{str(err).splitlines()[0]}") from None

        if args.evaluate:
            trace = [] if args.save_trajectories else None
            stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes, eval_residual(),
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
        rb = ReplayBuffer(args.buffer_size, res_dim, act_dim, args.num_envs, device)
        global_step, num_updates, update_debt = 0, 0, 0.0
        eval_base_stats = None
        if ckpt:
            if "qfs" not in ckpt:  # written before --num-q: two critics under their own names, in the same order
                for key in ("qfs", "qfs_target"):
                    ckpt[key] = {f"{i}.{k}": v for i, name in enumerate(("qf1", "qf2"))
                                 for k, v in ckpt[name + key[3:]].items()}
            qfs.load_state_dict(ckpt["qfs"]), qfs_target.load_state_dict(ckpt["qfs_target"])
            q_optimizer.load_state_dict(ckpt["q_optimizer"]), actor_optimizer.load_state_dict(ckpt["actor_optimizer"])
            a_optimizer.load_state_dict(ckpt["a_optimizer"])
            with torch.no_grad():
                log_alpha.copy_(ckpt["log_alpha"])
            if ckpt["rb"]["data"]["obs"].shape[1] != res_dim:
                raise common.ConfigError(
                    f"{args.checkpoint}: its replay buffer holds {ckpt['rb']['data']['obs'].shape[1]}-dim states, this "
                    f"version stores {res_dim} (states with their task features): written by an older "
                    "sac_residual.py; --evaluate works with it, training resumes from this version's checkpoints")
            rb.load_state_dict(ckpt["rb"])
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
                # the min over a random --num-q-target of the critics (all of them by default: clipped double Q);
                # drawn on the host, so a GPU run does not wait for the device to read the draw back
                members = (range(args.num_q) if args.num_q_target >= args.num_q else
                           torch.randperm(args.num_q)[: args.num_q_target].tolist())
                min_q_next = torch.stack([qfs_target[i](next_x, next_action) for i in members]).min(0).values
                # Bootstrap unless the episode truly ended (success); time-limit truncations do bootstrap.
                soft_v_next = min_q_next - alpha * next_log_pi[:, None]
                target = b["reward"] + (1 - b["terminated"]) * b["discount"] * soft_v_next
            x = rl_obs(b["obs"], b["a_base"])
            qs = torch.stack([qf(x, b["action"]) for qf in qfs])  # the critics score the executed action
            qf_losses = torch.stack([F.mse_loss(q, target) for q in qs])
            q_optimizer.zero_grad()
            qf_losses.sum().backward()
            q_optimizer.step()
            return torch.stack([qs[0].mean(), qs[1].mean(), qf_losses[0], qf_losses[1], qf_losses.mean()]).detach()

        def update_actor(b, alpha, l2):
            x = rl_obs(b["obs"], b["a_base"])
            a_res, log_pi, a_mean = actor.get_action(x)
            action = common.compose_action(b["a_base"], a_res, args.residual_scale)
            min_q = torch.stack([qf(x, action) for qf in qfs]).min(0).values[:, 0]
            actor_loss = (alpha * log_pi - min_q).mean()
            actor_loss = actor_loss + l2 * a_mean.pow(2).sum(-1).mean()
            actor_optimizer.zero_grad()
            actor_loss.backward(inputs=actor_params)  # no gradients for the critics' weights: ~25% of this update
            actor_optimizer.step()
            if actor_ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, actor_params, 1.0 - args.eval_ema)
            alpha_loss = -(log_alpha.exp() * (log_pi.detach() + args.target_entropy)).mean()
            if args.autotune:
                a_optimizer.zero_grad()
                alpha_loss.backward()
                a_optimizer.step()
            # detached: summed for logging, a tensor with history would keep every update's graph alive (with
            # backward(inputs=...) the critics' saved activations are never freed: ~15 GB by 140k env steps)
            return torch.stack([actor_loss, alpha_loss]).detach()

        def residual_l2(step):
            """The L2 weight at this env step: --residual-l2, or on its way to --residual-l2-final."""
            if args.residual_l2_final is None:
                return args.residual_l2
            frac = min(max(step - args.learning_starts, 0) / args.residual_l2_decay_steps, 1.0)
            return args.residual_l2 + frac * (args.residual_l2_final - args.residual_l2)

        def soft_update():
            with torch.no_grad():
                torch._foreach_lerp_(target_params, online_params, args.tau)

        def policy_step(res_state, a_base, eps=None):
            with torch.no_grad():
                a_res, _, _ = actor.get_action(rl_obs(res_state, a_base), eps)
            # A diverged actor must not send NaN to the simulator; the loss check below stops the run.
            return torch.where(torch.isfinite(a_res), a_res, 0.0)

        if args.compile:
            update_critic, update_actor, policy_step = (torch.compile(f) for f in (update_critic, update_actor,
                                                                                  policy_step))

        def run_eval():
            nonlocal eval_base_stats
            t0 = time.perf_counter()
            if eval_base_stats is None:  # the base alone, once: the line the residual must beat
                eval_base_stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes,
                                                  seed=args.seed + 10_000)
            stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes, eval_residual(),
                                    args.residual_scale, seed=args.seed + 10_000)
            logger.log({f"eval/{k}": v for k, v in stats.items() if k != "episodes"}, global_step)
            logger.log({f"eval_base/{k}": v for k, v in eval_base_stats.items() if k != "episodes"}, global_step)
            raw = ""
            if actor_ema is not None:  # the actor itself, on the same episodes (evaluate() reseeds the eval envs)
                raw_stats = common.evaluate(eval_envs, eval_base, args.num_eval_episodes, eval_residual(actor),
                                            args.residual_scale, seed=args.seed + 10_000)
                logger.log({f"eval_raw/{k}": v for k, v in raw_stats.items() if k != "episodes"}, global_step)
                raw = f" (the actor itself {raw_stats['success_at_end']:.2f})"
            logger.log({"time/eval": time.perf_counter() - t0}, global_step)
            print(f"step {global_step}: eval success_at_end {stats['success_at_end']:.2f}{raw} (base alone "
                  f"{eval_base_stats['success_at_end']:.2f}), success_once {stats['success_once']:.2f}, "
                  f"return {stats['return']:.2f} over {stats['episodes']} episodes")

        # --noise-beta: one noise sequence per env and episode, read one step at a time (white noise: none)
        colored = args.noise_beta > 0
        noise_len = envs.max_episode_steps if colored else 1
        noise_shape = (args.num_envs, len(actor.dims))
        noise, noise_t = torch.zeros(*noise_shape, noise_len, device=device), torch.zeros(
            args.num_envs, dtype=torch.long, device=device)
        env_rows = torch.arange(args.num_envs, device=device)
        # --residual-hold: each env's step in its episode and the residual it holds
        ep_t = torch.zeros(args.num_envs, dtype=torch.long, device=device)
        a_res_held = torch.zeros(args.num_envs, act_dim, device=device)

        def restart_envs():
            """Reset every train env with a seed derived from the step: a checkpoint taken here resumes exactly."""
            nonlocal noise
            rb.end_episodes()
            ep_t.zero_()
            if colored:  # from the same seed, not the global RNG, so the resumed run draws the same sequences
                noise = colored_noise(args.noise_beta, noise_shape, noise_len, device, torch.Generator(
                    device=device).manual_seed(args.seed + global_step))
                noise_t.zero_()
            obs = envs.reset(seed=args.seed + global_step, reconfigure=True)
            base.reset(torch.ones(args.num_envs, dtype=torch.bool, device=envs.device), seed=args.seed + global_step)
            return common.residual_state(obs["state"].to(device), args.task_features), base(obs).to(device)

        def save():
            params = [p for net in (actor, qfs) for p in net.parameters()]
            if not torch.isfinite(losses).all() or not all(torch.isfinite(p).all() for p in params):
                raise FloatingPointError(f"non-finite loss or weights at step {global_step}")
            if args.save_model:
                common.save_checkpoint(ckpt_path, dict(
                    script="sac_residual.py", base=args.base, args=vars(args), run_name=run_name,
                    actor=actor.state_dict(), qfs=qfs.state_dict(), qfs_target=qfs_target.state_dict(),
                    q_optimizer=q_optimizer.state_dict(), actor_optimizer=actor_optimizer.state_dict(),
                    a_optimizer=a_optimizer.state_dict(), log_alpha=log_alpha.detach().cpu(),
                    actor_ema=None if actor_ema is None else actor_ema.state_dict(),
                    obs_rms=obs_rms.state_dict(), rb=rb.state_dict(), global_step=global_step,
                    num_updates=num_updates, update_debt=update_debt, eval_base=eval_base_stats,
                    rng=common.rng_state(),
                ))

        # ---- training loop ----
        hold = args.residual_hold  # transitions start at decisions: rb.sample(..., hold)
        res_state, a_base = restart_envs()  # the residual's state: s and its task features
        if ckpt is None:
            run_eval()
        env_device = envs.device
        ep_sums = torch.zeros(5, device=device)  # finished episodes: count, return, len, success_once, success_at_end
        term_sums = torch.zeros(len(common.REWARD_TERMS), device=device)
        norm_sums = torch.zeros(3, device=device)  # |a_base|, |scale * a_res|, fraction of steps with the residual on
        losses = torch.zeros(7, device=device)
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
                # buffer states are normalised at sample time, so stored data never goes stale
                obs_rms.update(res_state)
                if global_step < args.learning_starts:
                    a_res = torch.zeros_like(a_base)  # base-only rollouts: the critic's warm-up data
                else:
                    a_res = policy_step(res_state, a_base, noise[env_rows, :, noise_t] if colored else None)
                    if args.progressive_steps > 0:  # Policy Decorator's progressive exploration schedule
                        p = min((global_step - args.learning_starts) / args.progressive_steps, 1.0)
                        a_res = a_res * (torch.rand(args.num_envs, 1, device=device) < p)
                    if hold > 1:  # a new residual at each env's decision steps, held in between
                        a_res = torch.where((ep_t % hold == 0)[:, None], a_res, a_res_held)
                        a_res_held = a_res
                action = common.compose_action(a_base, a_res, args.residual_scale)
                norm_sums += torch.stack([a_base.norm(dim=-1).sum(), (args.residual_scale * a_res).norm(dim=-1).sum(),
                                          (a_res != 0).any(-1).float().sum()])
                envs.step_async(action.to(env_device))

                # ---- updates, while the CPU env workers simulate this step (on the data up to the last one) ----
                t_rollout += time.perf_counter() - t0
                t0 = time.perf_counter()
                if global_step >= max(args.learning_starts, 1):
                    if num_updates == 0:  # critic warm-up before the actor acts or learns
                        for _ in range(args.critic_warmup_updates):
                            update_critic(rb.sample(args.batch_size, args.n_step, args.gamma, hold),
                                          log_alpha.exp().detach())
                            soft_update()
                    update_debt += args.utd * args.num_envs
                    while update_debt >= 1:
                        update_debt -= 1
                        alpha = log_alpha.exp().detach()
                        q_stats = update_critic(rb.sample(args.batch_size, args.n_step, args.gamma, hold), alpha)
                        a_stats = torch.zeros(2, device=device)
                        if num_updates % args.policy_frequency == 0:
                            a_stats = update_actor(rb.sample(args.batch_size, hold=hold), alpha,
                                                   residual_l2(global_step))
                        if num_updates % args.target_network_frequency == 0:
                            soft_update()
                        num_updates += 1
                        losses += torch.cat([q_stats, a_stats])
                        loss_count += 1
                t_update += time.perf_counter() - t0

                t0 = time.perf_counter()
                next_obs, reward, terminated, truncated, info = envs.step_wait()
                done = terminated | truncated
                base.reset(done)
                next_a_base = base(next_obs).to(device)  # also the base action of the next iteration
                done = done.to(device)
                if colored:  # the next step of each env's sequence; a fresh sequence where an episode ended
                    noise = torch.where(done[:, None, None], colored_noise(args.noise_beta, noise_shape, noise_len,
                                                                           device), noise)
                    noise_t = torch.where(done, 0, (noise_t + 1).clamp(max=noise_len - 1))
                # Bootstrap input [s', a_base']: at an episode end the base is not queried on the terminal state (a
                # chunked VLA would spend a query on a state it never acts from): a_base stands in for a_base'.
                # the task features of the true next states (terminal where an episode ended) and of the next
                # iteration's, in one call; stored with the states, so no update recomputes them
                final_res_state, next_res_state = common.residual_state(
                    torch.cat([info["final_obs"]["state"], next_obs["state"]]).to(device), args.task_features).chunk(2)
                rb.add(obs=res_state, a_base=a_base, action=action, reward=reward.to(device), next_obs=final_res_state,
                       next_a_base=torch.where(done[:, None], a_base, next_a_base), terminated=terminated.to(device),
                       done=done, phase=ep_t % hold)
                ep_t = torch.where(done, 0, ep_t + 1)
                res_state, a_base = next_res_state, next_a_base
                global_step += args.num_envs

                # bookkeeping stays on the device: no .item() in the loop
                d, ep = done.float(), info["episode"]
                ep_sums += torch.stack([d.sum()] + [(ep[k].to(device).float() * d).sum() for k in EPISODE_KEYS])
                if args.reward == "staged":
                    term_sums += torch.stack([info[f"reward/{k}"].to(device).sum() for k in common.REWARD_TERMS])
                t_rollout += time.perf_counter() - t0

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
                                     "losses/qf2_loss": l[3], "losses/qf_loss": l[4],
                                     "losses/actor_loss": l[5], "losses/alpha_loss": l[6],
                                     "losses/residual_l2": residual_l2(global_step)})
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
                    res_state, a_base = restart_envs()
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
