"""Residual SAC that learns an exploration strategy from a few demonstrations (paper section 3.1).

The hole sits behind an opaque panel (common.HIDDEN_ENV_ID): base and residual see only an estimate of it, 1-2 cm
off in the box face, plus the peg-box contact force. A base aiming at the estimate jams the peg on the face and never
succeeds. A person would press the peg against the face near the estimate and sweep it until it drops in. This script
  1. scripts that person (SpiralSearchDemo: the expert's approach to the estimate, then an Archimedean spiral with a
     pitch of 4 mm, below the hole's clearance diameter, pressed against the face, then a compliant push), with
     nothing but what the policy sees, and saves a few of its successful episodes in ManiSkill's trajectory format
     (h5 + json; `--generate-demos`, or automatically, cached, when no `--demos` file is given), recorded with a
     little noise on the executed actions and the clean ones kept as labels (DART, `--demo-noise`);
  2. loads demonstrations in that format (ours or a user's teleoperated ones) by replaying their actions in the
     simulator, which recomputes what a file may lack: the base's actions, the staged reward, terminations;
  3. trains residual SAC on them, RLPD-style, with what lets a policy hold a strategy rather than copy actions:
     - symmetric sampling: every batch is half online data, half demonstration transitions (RLPD);
     - demonstrations relabelled as residuals relative to the base: the critic scores the executed demo action, the
       behaviour-cloning target is clip((a_label - a_base) / scale), a_label the demonstrator's clean action;
     - a BC term that fades: the actor starts from `--bc-pretrain-updates` of BC on the demonstrations, then keeps
       `bc_coef * |tanh(mean) - target|^2` on the demo half of its batch, decayed linearly to 0 over
       `--bc-decay-steps`, next to the critic's term divided by its mean |Q| (TD3+BC's normalisation);
     - an observation made for a search (`--search-features`): the head's offset from the estimate in the face plane,
       its depth past the face, the contact force, and a SearchClock: steps since the held peg touched the face and
       the point a spiral pattern would have reached by then. Not the full state (`--full-state`): from ~1150
       demonstration transitions an MLP on all 46 state dimensions memorises them and fails on new episodes
       (behaviour cloning alone: 0.10 success with the full state, 0.65 with these features; 20 episodes each);
     - the residual acts on the arm only (`--residual-gripper`) and only once the peg has touched the face
       (`--gate-on-contact`): the base approaches and grasps, the residual learns the search. Without the gate, RL
       updates spilled into the approach and broke the grasp.
     - what keeps RL from undoing what BC learned (measured, RESULTS.md): training episodes that go on after the
       insertion, as the evaluation's do (`--continue-after-success`), a strong BC term (`--bc-coef 10`) and an actor
       10x slower than the critic (`--policy-lr 3e-5`); together, not one by one. `--ibrl` (the frozen BC residual
       beside the RL one, the critic choosing between them) is an option that did not help here.
Otherwise this is sac_residual.py (bounded residual starting at zero, critic on the executed action, LayerNorm
critics, n-step returns, update-to-data knob, exact resume), in its own file to be read top to bottom.

    python demo_explore_sac.py                                  # CPU: generates/caches 10 demos, then trains
    python demo_explore_sac.py --generate-demos --num-demos 10 --demos demos/mine.h5      # only write demos
    python demo_explore_sac.py --demos my_teleop.h5 --num-demos 3                         # bring your own
    python demo_explore_sac.py --total-timesteps 0                                        # BC alone, evaluated
    python demo_explore_sac.py --evaluate --checkpoint runs/<run>/ckpt.pt

Logged: as sac_residual.py, plus eval/median_steps_to_success (the bounded search: the median, over the successful
episodes, of the step of first success), losses/{bc_loss,bc_coef,bc_pretrain_loss},
demos/{episodes,transitions,mean_len,residual_saturated}. Demonstrations replay on the CPU back end whatever
--sim-backend says (CPU physics is deterministic; episodes recorded on the GPU back end may not replay to success).
"""

import copy
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common
from common import (CONTACT_FORCE, HOLE_POSE, PEG_HALF_SIZE, PEG_POSE, TCP_POSE, ExpertBase, _clip_norm, _to_frame,
                    matrix_to_axis_angle, quaternion_to_matrix)


@dataclass
class Args:
    # experiment
    exp_name: str = "demo_explore_sac"
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

    # demonstrations
    demos: Optional[str] = None
    """demonstrations in ManiSkill's trajectory format (<path>.h5 + <path>.json, pd_ee_delta_pose actions); unset:
    the default scripted set, demos/spiral_<env id>.h5, generated on first use and cached"""
    num_demos: int = 10
    """how many demonstration episodes to use (the file's first ones), or to write with --generate-demos"""
    generate_demos: bool = False
    """write --num-demos successful episodes of the scripted search to --demos (or the default path) and exit"""
    demo_seed: int = 1000
    """seed of the scripted demonstrations' episodes (kept apart from training and eval seeds)"""
    demo_noise: float = 0.05
    """DART (Laskey et al. 2017): std of Gaussian noise (action units) added to the scripted demonstrator's arm
    actions while it records, so the demonstrations visit the near misses a cloned policy drifts into, each labelled
    with the demonstrator's clean action (saved as `expert_actions`, the BC target; `actions` stay the executed ones,
    so the file replays). 0: clean demonstrations. The default cache gets its own file per noise level. Measured
    (BC alone on 10 demonstrations, 50 episodes, seeds 1/2/3): 0.78/0.74/0.76 success with 0.05, 0.58/0.62/0.62
    clean; 0.1 gave 0.72 (seed 1), and the noisy demonstrator itself then failed half its episodes"""

    # environment
    env_id: str = common.HIDDEN_ENV_ID
    """the ManiSkill task (the hidden-hole variant; the plain task works too)"""
    num_envs: int = 2
    """parallel training envs (CPU: one process each; GPU: e.g. 512)"""
    num_eval_envs: int = 2
    """parallel eval envs"""
    num_eval_episodes: int = 50
    """episodes per evaluation (ManiSkill's protocol: full length, reconfigured)"""
    eval_freq: int = 10_000
    """evaluate (and checkpoint) every this many env steps"""
    control_mode: str = "pd_ee_delta_pose"
    """the controller; the scripted bases and demonstrator need pd_ee_delta_pose"""
    sim_backend: str = "auto"
    """auto (GPU if CUDA is there), physx_cuda or physx_cpu"""
    reward: str = "staged"
    """staged (paper section 2.3), normalized_dense (ManiSkill's) or sparse"""
    reward_lateral: float = 0.0
    """with the staged reward (ignored by the others): weight of the term for the peg head's lateral distance from the
    hole axis while inserting (common.StagedRewardConfig.d3; sac_residual.py's --reward-lateral, 10 there). 0, the
    paper's reward, is what this script's measurements used (RESULTS.md); the demonstrations are replayed with it too"""
    total_timesteps: int = 20_000
    """total env steps (20k on CPU with 2 envs: all three seeds measured were at 0.92-0.94 there; later evaluations
    swing between 0.64 and 0.90 (five runs at 30k, RESULTS.md), whether the BC term fades over 40k steps, 100k or
    never)"""
    max_episode_steps: Optional[int] = None
    """episode length of the training and eval envs (None: the task's, 100 steps for PegInsertionSide-v1);
    shorter only for quick runs and tests: success_at_end is defined at the task's limit"""

    # base policy and residual
    base: str = "expert"
    """the frozen base: pi0:<hub id or folder>, expert, coarse[:key=value,...] or zero. `expert` here aims at the
    hole estimate: it reaches the face and jams there (0 % success on the hidden variant)"""
    residual_scale: float = 0.5
    """bound of the residual in action units: a = clip(a_base + scale * tanh(.)). A search moves the head up to ~2 cm
    from where the base aims, which its position gain turns into ~0.3 action units"""
    residual_gripper: bool = False
    """whether the residual may change the gripper command too; by default it corrects the arm only: a search is an
    arm motion, and a residual that learns to open the hand drops the peg (seen in our first runs)"""
    residual_sees_base: bool = True
    """whether the residual observes [s, a_base] (paper 2.1) rather than s alone"""
    gate_on_contact: bool = True
    """whether the residual acts only once the held peg has touched the box face (the SearchClock has started): the
    base approaches and grasps, the residual learns the search. Without it, in our runs, RL updates spilled into the
    approach and broke the grasp (BC start 0.50 -> 0.15 success at 10k steps, returns from -50 to -150)"""
    full_state: bool = False
    """whether the residual observes the full state too; by default only the task and search features (and a_base):
    from 10 demonstrations (~1150 transitions) an MLP on the full 46-dim state fits them to a loss of 4e-5 and still
    fails on new episodes (BC alone 0.10 success, 20 episodes): it keys on dimensions that say nothing about a search"""
    task_features: bool = True
    """whether the residual also observes common.task_features(s) (head vs the hole estimate: offset, depth, tilt)"""
    search_features: bool = True
    """whether the residual also observes search_features(s) (the head's offset from the estimate in the face plane,
    unclipped, its depth past the face, the contact force's size) and the SearchClock (steps since the peg touched the
    face, and a spiral pattern's point at that time): what a search strategy needs"""

    # learning from demonstrations
    demo_ratio: float = 0.5
    """fraction of every batch drawn from the demonstrations (RLPD's symmetric sampling: 0.5)"""
    bc_pretrain_updates: int = 5_000
    """actor updates of behaviour cloning on the demonstrations before any env step (0: none)"""
    bc_coef: float = 10.0
    """weight of the BC term on the demo half of the actor's batch at the start of training (the critic's term is
    divided by its mean |Q|, as in TD3+BC, so the two are on one scale whatever the reward's size; 10: RL improves
    on BC rather than undoing it, with the two settings below) ..."""
    bc_decay_steps: int = 40_000
    """... decayed linearly to 0 over this many env steps: RL takes over from imitation (seed 3 at 30k: 0.64 with
    40k; 0.80 with 100k and 0.74 with no decay at all, so the fade is not what holds success past 20k)"""
    eval_ema: float = 0.0
    """evaluate a Polyak average of the actor instead of the actor itself (0: off): after every actor update the
    average moves towards it by 1 - this decay, and evaluations and `--evaluate` use the average. Evaluations of the
    actor swing by 0.1-0.2 between checkpoints; in a 3-seed probe 0.9998 held success past the default budget (30k:
    mean 0.89 vs 0.79) but trailed the actor at 20k (0.87 vs 0.93), so it is off at the default budget (RESULTS.md)"""
    ibrl: bool = False
    """IBRL (Hu et al. 2023, imitation-bootstrapped RL): keep the behaviour-cloned residual, frozen, beside the RL
    one; wherever an action is chosen (acting, evaluating, and the critic's bootstrap) take whichever of the two the
    critic values more. RL can then add to what BC does well without having to unlearn it first"""
    continue_after_success: bool = True
    """whether training episodes (and the demonstrations' replay) go on after the insertion until the time limit, as
    the evaluation's do, so the data holds states after an insertion and the reward (1 per step while inserted, < 0
    once the peg comes out) pays for holding it; success is then no longer terminal for the critic. With these
    defaults RL improves on BC on 3 of 3 seeds (RESULTS.md); each of the three changes alone did not (probes, in
    benchmarks/results/logs/demo_explore_probes.md): without the post-insertion data RL inserts, then loses the peg"""

    # algorithm
    gamma: float = 0.97
    """the discount factor (200-step episodes: a search takes 50-150 steps)"""
    n_step: int = 5
    """n-step returns for the critic's target (1: plain TD)"""
    tau: float = 0.01
    """target smoothing coefficient"""
    batch_size: int = 256
    """the batch size of each update (online + demonstration rows)"""
    buffer_size: int = 1_000_000
    """the online replay memory size (capped at total_timesteps)"""
    learning_starts: int = 5_000
    """env steps before any update: the BC-initialised residual acts meanwhile, so the critic warms up on data of the
    policy it will improve"""
    critic_warmup_updates: int = 2_000
    """critic-only updates before the actor starts learning from the critic"""
    utd: float = 0.5
    """update-to-data ratio: gradient updates per env step"""
    policy_lr: float = 3e-5
    """the learning rate of the actor (and of its BC start): 10x below the critic's, so the actor cannot chase the
    critic's errors faster than the critic corrects them (3e-4: RL undid the BC start, 0.78 -> 0.50 in 10k steps)"""
    q_lr: float = 3e-4
    """the learning rate of the critics"""
    alpha: float = 0.001
    """entropy coefficient (fixed, as in sac_residual.py: per-step rewards are O(0.1))"""
    residual_l2: float = 0.05
    """weight of an L2 pull of the residual's mean towards 0 (sac_residual.py uses 0.1; here the demonstrations say
    where the residual must be large, and the pull would fight them)"""
    init_std: float = 0.2
    """initial std of the residual's pre-tanh Gaussian"""
    layer_norm: bool = True
    """whether the critics use LayerNorm (RLPD: needed with demonstrations and high update ratios)"""
    hidden_dim: int = 256
    """width of the actor and critic MLPs"""

    # speed
    threads: int = 1
    """torch threads of the learner when it runs on the CPU (the env workers are processes of their own)"""

    # runtime
    log_freq: int = 2_000
    """log every this many env steps"""


# ------------------------------------------------------------------------------------------------------------------
# The human strategy, scripted: approach the estimate, press against the face, spiral until the head drops in, push
# ------------------------------------------------------------------------------------------------------------------
def spiral(arc: torch.Tensor, pitch: float, max_radius: float) -> torch.Tensor:
    """(B, 2) point of the Archimedean spiral r = pitch * theta / 2 pi at arc length `arc` (B, 1) from its centre;
    once r reaches max_radius the point circles there."""
    b = pitch / (2 * math.pi)
    theta = (2 * arc / b).sqrt()  # the arc length of r = b theta is ~ b theta^2 / 2
    r = (b * theta).clamp(max=max_radius)
    return torch.cat([r * theta.cos(), r * theta.sin()], -1)


def holding_at_face(state: torch.Tensor, f_contact: float = 1.0) -> torch.Tensor:
    """(B,) bool: the peg is in the hand and its head touches the box face (head within 3 mm of the face plane of the
    hole estimate, or a peg-box contact force above f_contact newtons). Where a search starts."""
    tcp, peg, hole = state[:, TCP_POSE], state[:, PEG_POSE], state[:, HOLE_POSE]
    R_peg, R_hole = quaternion_to_matrix(peg[:, 3:]), quaternion_to_matrix(hole[:, 3:])
    L, radius = state[:, PEG_HALF_SIZE][:, 0], state[:, PEG_HALF_SIZE][:, 1]
    head = _to_frame(R_hole, hole[:, :3], peg[:, :3] + R_peg[:, :, 0] * L[:, None])
    tcp_in_peg = _to_frame(R_peg, peg[:, :3], tcp[:, :3])
    holding = (tcp_in_peg[:, 1:].norm(dim=-1) < radius + 0.01) & (state[:, 7:9].sum(-1) < 2 * radius + 0.004)
    force = (state[:, CONTACT_FORCE].norm(dim=-1) if state.shape[1] >= CONTACT_FORCE.stop
             else torch.zeros_like(L))
    return holding & ((head[:, 0] > -L - 0.003) | (force > f_contact))


class SpiralSearchDemo(common.BasePolicy):
    """A demonstrator that uses only the policy's observation (the hole *estimate*, the contact force).

    Phases per env: (0) the expert's approach and grasp, aiming at the estimate; (1) once the head touches the face
    (contact force or head at the face plane): the head's target runs along an Archimedean spiral r = pitch * theta
    / 2 pi around the estimate, `speed` of arc per step, pressed `press` into the face; (2) once the head is past the
    face plane (it dropped into the hole): push along the axis, laterally compliant (the hole guides it), back to (1)
    if it slips out. A pitch below the 3 mm radial clearance's diameter means the sweep passes within pitch / 2 of
    any point. `--generate-demos` prints its success rate and median steps over the episodes it ran (RESULTS.md).
    """

    @dataclass
    class Config:
        pitch: float = 0.004  # m per turn
        speed: float = 0.004  # m of arc per step
        press: float = 0.006  # m the target is pushed past the face while sweeping
        f_contact: float = 1.0  # N that count as touching the face
        max_radius: float = 0.025  # m: the sweep circles here once the spiral reaches it

    def __init__(self, num_envs, device, **config):
        self.cfg, self.device = self.Config(**config), torch.device(device)
        self.expert = ExpertBase(num_envs, device)
        self._init_caches(num_envs)

    def _init_caches(self, num_envs):
        self.num_envs = num_envs
        self.expert = self.expert.resized(num_envs)
        self.phase = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.arc = torch.zeros(num_envs, 1, device=self.device)

    def reset(self, mask, seed=None):
        mask = mask.to(self.device)
        self.expert.reset(mask)
        self.phase[mask], self.arc[mask] = 0, 0.0

    @torch.no_grad()
    def __call__(self, obs):
        s, P = obs["state"].to(self.device), self.cfg
        tcp, peg, hole = s[:, TCP_POSE], s[:, PEG_POSE], s[:, HOLE_POSE]
        p_tcp, p_peg, p_hole = tcp[:, :3], peg[:, :3], hole[:, :3]
        R_tcp, R_peg, R_hole = (quaternion_to_matrix(x[:, 3:]) for x in (tcp, peg, hole))
        L = s[:, PEG_HALF_SIZE][:, :1]
        n = R_hole[:, :, 0]
        head = _to_frame(R_hole, p_hole, p_peg + R_peg[:, :, 0] * L)  # head in the estimated hole frame
        tcp_in_peg = _to_frame(R_peg, p_peg, p_tcp)
        entered = head[:, 0] > -L[:, 0] + 0.004

        ph = torch.where((self.phase == 0) & holding_at_face(s, P.f_contact), 1, self.phase)
        ph = torch.where((ph == 1) & entered, 2, ph)
        ph = torch.where((ph == 2) & (head[:, 0] < -L[:, 0] + 0.001), 1, ph)  # slipped back out: search on
        self.phase = ph
        self.arc = self.arc + P.speed * (ph == 1).float()[:, None]

        def in_face(off):  # world point of the face-plane offset `off` (B, 2) from the estimate
            return p_hole + (R_hole[:, :, 1:] @ off.unsqueeze(-1)).squeeze(-1)

        def tcp_for_head(head_des):  # TCP target that puts the head there, the peg on the hole axis as it is held
            return head_des - n * L + (R_hole @ tcp_in_peg.unsqueeze(-1)).squeeze(-1)

        pos_search = tcp_for_head(in_face(spiral(self.arc, P.pitch, P.max_radius)) + n * (P.press - L))
        hx_push = torch.minimum(head[:, :1] + 0.01, torch.zeros_like(L))  # insert: 1 cm per step to full depth
        pos_push = tcp_for_head(in_face(head[:, 1:]) + n * hx_push)
        pos = torch.where((ph == 1)[:, None], pos_search, pos_push)
        R_des = R_hole @ (R_peg.transpose(1, 2) @ R_tcp)  # peg axis on the hole axis, the grip as it is
        cfg = self.expert.cfg
        dpos = _clip_norm(cfg.kp * (pos - p_tcp) / 0.1, cfg.max_pos)
        drot = _clip_norm(-cfg.kr * matrix_to_axis_angle(R_des @ R_tcp.transpose(1, 2)) / 0.1, cfg.max_rot)
        a_search = torch.cat([dpos, drot, -torch.ones_like(L)], -1)
        return torch.where((ph == 0)[:, None], self.expert(obs), a_search)


SEARCH_FEATURE_DIM = 4


def search_features(state: torch.Tensor) -> torch.Tensor:
    """(B, 4): the peg head's offset from the hole estimate in the face plane (2, cm, unclipped), its depth past the
    face plane (1, cm, clipped to [-10, 5]) and log(1 + |contact force| / 1 N) (1)."""
    peg, hole = state[:, PEG_POSE], state[:, HOLE_POSE]
    R_peg, R_hole = quaternion_to_matrix(peg[:, 3:]), quaternion_to_matrix(hole[:, 3:])
    L = state[:, PEG_HALF_SIZE][:, :1]
    head = _to_frame(R_hole, hole[:, :3], peg[:, :3] + R_peg[:, :, 0] * L)
    force = state[:, CONTACT_FORCE].norm(dim=-1, keepdim=True) if state.shape[1] >= CONTACT_FORCE.stop else 0 * L
    return torch.cat([100 * head[:, 1:], (100 * (head[:, :1] + L)).clamp(-10, 5), torch.log1p(force)], -1)


class SearchClock:
    """The search's progress as three columns appended to the state: k / 100, k being the steps since the held peg
    first touched the box face in this episode (holding_at_face), and the point of a spiral search pattern at k steps
    (cm, in the face plane, around the hole estimate; the demonstrator's default pitch and speed).

    The environment's state has no memory of the episode, and a deterministic policy that must sweep outward over
    time needs one. Handing it time alone is not enough: a spiral as a function of time is cos/sin of sqrt(k), which
    an MLP does not fit from a few demonstrations (behaviour cloning on k alone: 0.00-0.05 success, 20 episodes).
    With the pattern's point given, following it is a linear function of (point - head offset), and what the
    demonstrations teach is the strategy: when to start, how hard to press, when the head has dropped in, how to
    push; RL may leave the pattern wherever the critic says so.

    `observe(state)` is called once per new observation (it counts); `peek(state)` gives what observe would, without
    counting (for the bootstrap state of a transition); `reset(mask)` with the envs' episode resets. Off (`enabled`
    False) the column is left out."""

    DIM = 3

    def __init__(self, num_envs, device, enabled=True):
        self.enabled = enabled
        self.k = torch.zeros(num_envs, device=device)
        self.on = torch.zeros(num_envs, dtype=torch.bool, device=device)

    def reset(self, mask):
        mask = mask.to(self.k.device)
        self.k, self.on = self.k * ~mask, self.on & ~mask

    def _next(self, state):
        on = self.on | holding_at_face(state).to(self.on.device)
        return on, self.k + on.float()

    def _augment(self, state, k):
        if not self.enabled:
            return state
        P = SpiralSearchDemo.Config()
        point = spiral((P.speed * k)[:, None], P.pitch, P.max_radius)
        return torch.cat([state, (k / 100)[:, None].to(state), (100 * point).to(state)], -1)

    def peek(self, state):
        return self._augment(state, self._next(state)[1])

    def observe(self, state):
        self.on, self.k = self._next(state)
        return self._augment(state, self.k)


# ------------------------------------------------------------------------------------------------------------------
# Demonstrations in ManiSkill's trajectory format: write, read, replay
# ------------------------------------------------------------------------------------------------------------------
def default_demo_path(env_id: str, noise: float = 0.0) -> str:
    return os.path.join("demos", f"spiral_{env_id}" + (f"_dart{noise:g}" if noise else "") + ".h5")


def generate_demos(path: str, num_demos: int, env_id: str, num_envs: int, seed: int,
                   noise: float = 0.0) -> dict:
    """Run SpiralSearchDemo until `num_demos` episodes succeed; write the successful ones to <path>.h5/.json
    (ManiSkill's format, through its RecordEpisode) atomically. With `noise` > 0 the executed arm actions carry
    Gaussian noise (DART) and each episode also stores the clean actions as `expert_actions`. Returns stats of all
    episodes run."""
    tmp = tempfile.mkdtemp(prefix="demos_", dir=os.path.dirname(os.path.abspath(path)))
    try:
        envs = common.make_env(num_envs, "physx_cpu", env_id=env_id, seed=seed, record_dir=tmp,
                               reconfiguration_freq=1)
        demo = SpiralSearchDemo(num_envs, "cpu")
        gen = torch.Generator().manual_seed(seed)
        obs = envs.reset(seed=seed, reconfigure=True)
        trace, successes, episodes, steps = [], 0, 0, []
        while successes < num_demos:
            a = demo(obs)
            a_exec = a.clone()
            if noise:  # DART: perturb what is executed (the arm's 6 dims), keep the clean label
                a_exec[:, :6] += noise * torch.randn(a[:, :6].shape, generator=gen)
                a_exec = a_exec.clamp(-1, 1)
            obs, _, terminated, truncated, info = envs.step(a_exec)
            done = terminated | truncated
            trace.append((a.cpu(), (a_exec - a).cpu(), done.cpu()))  # saved as base_actions / residual_actions
            if done.any():
                demo.reset(done)
                ep = info["episode"]
                successes += int(ep["success_once"][done].sum())
                episodes += int(done.sum())
                steps += ep["success_step"][done & ep["success_once"]].tolist()
            if episodes > (4 if not noise else 10) * num_demos + 10:
                raise RuntimeError(f"the scripted search succeeded in only {successes} of {episodes} episodes")
        envs.close()  # flushes the recordings
        kept = common.keep_successful_trajectories(tmp, trace, num_envs, 0.0)
        import h5py

        with h5py.File(os.path.join(tmp, "trajectories.h5"), "a") as f:
            for name in f:  # the trace's "base" is the demonstrator's clean action, its "residual" the DART noise
                if noise:
                    f[name].move("base_actions", "expert_actions")
                else:
                    del f[name]["base_actions"]
                del f[name]["residual_actions"]
        with open(os.path.join(tmp, "trajectories.json")) as f:
            meta = json.load(f)
        meta.update(source_type="scripted", source_desc="demo_explore_sac.py SpiralSearchDemo: approach the hole "
                    "estimate, spiral pressed against the face, push (no access to the true hole)"
                    + (f"; DART noise {noise:g} on the executed arm actions, clean ones in expert_actions"
                       if noise else ""))
        with open(os.path.join(tmp, "trajectories.json"), "w") as f:
            json.dump(meta, f, indent=2)
        stem = os.path.splitext(path)[0]
        os.replace(os.path.join(tmp, "trajectories.json"), stem + ".json")
        os.replace(os.path.join(tmp, "trajectories.h5"), stem + ".h5")  # the h5 last: its presence means complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps_t = torch.tensor(steps)
    return dict(episodes=episodes, successes=successes, kept=kept, success_rate=successes / max(episodes, 1),
                median_steps_to_success=steps_t.median().item() if len(steps) else float("nan"))


def read_demo_file(path: str, num_demos: int, env_id: str, action_dim: Optional[int] = None
                   ) -> tuple[dict, list, list]:
    """(json metadata, [actions (T, A) per episode], [labels (T, A) per episode]) of the first `num_demos` episodes:
    the labels are `expert_actions` where the file has them (DART), else the actions. One-line errors for a missing,
    corrupt or mismatched file (A == action_dim, unless that is None: the caller checks it then)."""
    import h5py

    stem = os.path.splitext(path)[0]
    h5_path, json_path = stem + ".h5", stem + ".json"
    for p in (h5_path, json_path):
        if not os.path.isfile(p):
            raise common.ConfigError(f"demonstration file not found: {p} (ManiSkill's format needs both "
                                     f"{os.path.basename(h5_path)} and {os.path.basename(json_path)})")
    try:
        with open(json_path) as f:
            meta = json.load(f)
        episodes = meta["episodes"]
        file_env = meta["env_info"]["env_id"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise common.ConfigError(f"{json_path} is not a ManiSkill trajectory json ({type(err).__name__}: {err})") \
            from None
    if file_env != env_id:
        raise common.ConfigError(f"{json_path} holds {file_env} episodes, not {env_id}: pass --env-id {file_env}")
    if len(episodes) < num_demos:
        raise common.ConfigError(f"{json_path} holds {len(episodes)} episodes, --num-demos asks for {num_demos}")
    actions, labels = [], []
    try:
        with h5py.File(h5_path, "r") as f:
            for ep in episodes[:num_demos]:
                if ep.get("control_mode", "pd_ee_delta_pose") != "pd_ee_delta_pose":
                    raise common.ConfigError(f"{json_path}: episode {ep['episode_id']} uses control mode "
                                             f"{ep['control_mode']}; replay needs pd_ee_delta_pose")
                traj = f[f"traj_{ep['episode_id']}"]
                a = torch.as_tensor(traj["actions"][()], dtype=torch.float32)
                label = torch.as_tensor(traj["expert_actions"][()], dtype=torch.float32) \
                    if "expert_actions" in traj else a
                if a.ndim != 2 or a.shape[1] != (action_dim or a.shape[1]) or len(a) == 0:
                    raise common.ConfigError(f"{h5_path}: traj_{ep['episode_id']}/actions has shape "
                                             f"{tuple(a.shape)}, expected (T, {action_dim or 'A'})")
                if label.shape != a.shape:
                    raise common.ConfigError(f"{h5_path}: traj_{ep['episode_id']}/expert_actions has shape "
                                             f"{tuple(label.shape)}, expected {tuple(a.shape)} like its actions")
                actions.append(a)
                labels.append(label)
    except common.ConfigError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise common.ConfigError(f"{h5_path} is corrupt or not a ManiSkill trajectory file "
                                 f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return meta, actions, labels


def replay_demos(meta: dict, actions: list, labels: list, env_id: str, base_spec: str, reward: str,
                 seed: int, clock: bool = True, continuing: bool = False,
                 reward_cfg: Optional[common.StagedRewardConfig] = None) -> dict:
    """Replay each demonstration's actions from its recorded seed (CPU physics is deterministic) with the training
    env's reward and terminations and the frozen base alongside: the transitions the demo buffer needs, with base
    actions and staged rewards that the file need not hold. An episode that does not replay to success (e.g.
    recorded on another back end) is dropped with a warning. States carry the SearchClock columns if `clock`.
    `continuing`: success does not terminate (--continue-after-success), so the last transition bootstraps.
    `reward_cfg`: the staged reward's coefficients (common's defaults if None)."""
    envs = common.make_env(1, "physx_cpu", env_id=env_id, reward=reward, reward_cfg=reward_cfg, seed=seed,
                           reconfiguration_freq=1, ignore_terminations=continuing)
    base = common.make_base_policy(base_spec, envs, seed=seed)
    search_clock = SearchClock(1, "cpu", clock)
    keys = ("obs", "a_base", "action", "label", "reward", "next_obs", "next_a_base", "terminated", "done")
    data, lengths, dropped = {k: [] for k in keys}, [], 0
    try:
        for ep, acts, labs in zip(meta["episodes"], actions, labels):
            obs = envs.reset(seed=int(ep["episode_seed"]), reconfigure=True)
            base.reset(torch.ones(1, dtype=torch.bool), seed=seed)
            search_clock.reset(torch.ones(1, dtype=torch.bool))
            state = search_clock.observe(obs["state"])
            a_base, rows, ok = base(obs), {k: [] for k in keys}, False
            for t, a in enumerate(acts):
                next_obs, r, terminated, truncated, info = envs.step(a[None])
                done = terminated | truncated
                next_a_base = base(next_obs)
                next_state = search_clock.observe(info["final_obs"]["state"])
                for k, v in dict(obs=state, a_base=a_base, action=a[None], label=labs[t][None], reward=r,
                                 next_obs=next_state,
                                 next_a_base=torch.where(done[:, None], a_base, next_a_base),
                                 terminated=terminated, done=done | (t == len(acts) - 1)).items():
                    rows[k].append(v.float().reshape(1, -1))
                obs, state, a_base = next_obs, next_state, next_a_base
                if done.any():
                    ok = bool(info["episode"]["success_once"][0])
                    break
                ok = continuing and bool(info["success"][0])  # a continuing replay ends with the file's actions
            if not ok:
                dropped += 1
                print(f"warning: demonstration episode {ep['episode_id']} did not replay to success; dropped",
                      file=sys.stderr)
                continue
            for k in keys:
                data[k].append(torch.cat(rows[k]))
            lengths.append(len(rows["obs"]))
    finally:
        envs.close()
    if not lengths:
        raise common.ConfigError("no demonstration replayed to success: recorded with another simulator back end, "
                                 "env version or control mode?")
    out = {k: torch.cat(v) for k, v in data.items()}
    out["lengths"] = torch.tensor(lengths)
    return out


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
ARCH_ARGS = ("env_id", "control_mode", "residual_scale", "residual_gripper", "gate_on_contact", "residual_sees_base",
             "full_state", "task_features", "search_features", "hidden_dim", "layer_norm", "ibrl")
BC_TARGET_MAX = 0.97  # BC targets inside tanh's range, so the pre-tanh mean stays finite


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
# Replay buffer on the training device (as in sac_residual.py)
# ------------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Raw states (normalised at sample time), base actions and executed actions. Rows are added one env step at a
    time, `num_envs` rows per step, so env i's next step sits `num_envs` rows later: `sample(..., n_step)` walks
    that far to build n-step returns. The demonstrations go into one with num_envs=1, episode after episode."""

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
            self.data[k][idx] = batch[k].reshape(n, -1).float().to(self.data[k].device)
        self.full = self.full or self.ptr + n >= self.size
        self.ptr = (self.ptr + n) % self.size

    def sample(self, batch_size, n_step=1, gamma=1.0):
        """n-step transitions (uncorrected, stopping at an episode end or the newest data) with their discount."""
        high = self.size if self.full else self.ptr
        dev = self.data["obs"].device
        idx = torch.randint(0, high, (batch_size,), device=dev)
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
        self.add(**{k: v[order][-self.size :] for k, v in state["data"].items()})


if __name__ == "__main__":

    def main():
        args = tyro.cli(Args)
        # ---- validate and derive ----
        for name in ("num_envs", "num_eval_envs", "num_eval_episodes", "eval_freq", "batch_size", "log_freq",
                     "n_step", "num_demos"):
            if getattr(args, name) < 1:
                raise common.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.residual_scale <= 0:
            raise common.ConfigError(f"--residual-scale must be > 0, got {args.residual_scale}")
        if not 0 <= args.demo_noise <= 1:
            raise common.ConfigError(f"--demo-noise must be in [0, 1] (action units), got {args.demo_noise}")
        if not 0 <= args.eval_ema < 1:
            raise common.ConfigError(f"--eval-ema must be in [0, 1) (a decay per actor update), got {args.eval_ema}")
        if not 0 <= args.demo_ratio < 1:
            raise common.ConfigError(f"--demo-ratio must be in [0, 1), got {args.demo_ratio}")
        for name in ("total_timesteps", "utd", "learning_starts", "bc_pretrain_updates", "bc_coef", "bc_decay_steps"):
            if getattr(args, name) < 0:
                raise common.ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
        if not args.reward_lateral >= 0:
            raise common.ConfigError(f"--reward-lateral must be >= 0, got {args.reward_lateral}")
        if args.save_trajectories and not args.evaluate:
            raise common.ConfigError("--save-trajectories needs --evaluate --checkpoint C")
        if args.evaluate and not args.checkpoint:
            raise common.ConfigError("--evaluate needs --checkpoint C")
        if args.max_episode_steps is not None and args.max_episode_steps < 1:  # before demonstrations are generated
            raise common.ConfigError(f"--max-episode-steps must be >= 1, got {args.max_episode_steps}")
        common.check_reward(args.reward)
        if args.threads < 1:
            raise common.ConfigError(f"--threads must be >= 1, got {args.threads}")
        if args.control_mode != "pd_ee_delta_pose":
            raise common.ConfigError("demonstrations are replayed in pd_ee_delta_pose: --control-mode must be that")
        if not args.evaluate:  # now, not after the evaluation envs have started
            common.check_num_envs(args.num_envs, args.sim_backend)
        images = common.base_needs_images(args.base)
        if images:
            raise common.ConfigError("demonstrations are replayed without cameras: pick a state-based --base")

        ckpt = common.load_checkpoint(args.checkpoint, "demo_explore_sac.py", args.base) if args.checkpoint else None
        if ckpt:  # the policy is defined by these: take them from the checkpoint, whatever the command line says
            for name in ARCH_ARGS:
                setattr(args, name, ckpt["args"][name])
            args.eval_ema = ckpt["args"].get("eval_ema", 0.0)  # evaluate what the run evaluated; resume exactly
            args.reward_lateral = ckpt["args"].get("reward_lateral", 0.0)  # the task it learned
            if not args.evaluate:  # a resumed run replays the same demonstrations
                args.num_demos = ckpt["args"]["num_demos"]

        # ---- demonstrations: generate (cached) and/or read and check the file before any env starts ----
        demo_path = args.demos or (ckpt["demos"]["path"] if ckpt
                                   else default_demo_path(args.env_id, args.demo_noise))
        if args.generate_demos or (args.demos is None and not ckpt and not _has_demos(demo_path, args.num_demos)):
            os.makedirs(os.path.dirname(os.path.abspath(demo_path)), exist_ok=True)
            print(f"generating {args.num_demos} scripted search demonstrations -> {demo_path}", flush=True)
            stats = generate_demos(demo_path, args.num_demos, args.env_id, min(args.num_envs, os.cpu_count() or 1),
                                   args.demo_seed, args.demo_noise)
            print(json.dumps({f"demos/{k}": v for k, v in stats.items()}), flush=True)
            if args.generate_demos:
                return
        demo_meta, demo_actions, demo_labels = (None, None, None) if args.evaluate else read_demo_file(
            demo_path, args.num_demos, args.env_id)  # their action size is checked against the env's below

        run_name = (ckpt["run_name"] if ckpt and not args.evaluate
                    else f"{args.exp_name}__{args.seed}__{int(time.time())}")

        # ---- seed, device, envs ----
        common.seed_everything(args.seed, args.torch_deterministic)
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        reward_cfg = common.StagedRewardConfig(d3=args.reward_lateral)
        eval_envs = common.make_env(args.num_eval_envs, args.sim_backend, env_id=args.env_id,
                                    control_mode=args.control_mode, reward=args.reward, reward_cfg=reward_cfg,
                                    eval_mode=True, seed=args.seed + 10_000, record_dir=args.save_trajectories,
                                    video_dir=f"runs/{run_name}/videos" if args.capture_video else None,
                                    max_episode_steps=args.max_episode_steps)
        act_dim, env_state_dim = eval_envs.action_dim, eval_envs.state_dim
        state_dim = eval_envs.state_dim + (SearchClock.DIM if args.search_features else 0)  # + the clock's columns
        if demo_actions and demo_actions[0].shape[1] != act_dim:
            raise common.ConfigError(f"{demo_path}: its actions have {demo_actions[0].shape[1]} dimensions, the "
                                     f"env's {act_dim}")
        envs = None
        if not args.evaluate:
            envs = common.make_env(args.num_envs, args.sim_backend, env_id=args.env_id,
                                   control_mode=args.control_mode, reward=args.reward, reward_cfg=reward_cfg,
                                   seed=args.seed, ignore_terminations=args.continue_after_success,
                                   max_episode_steps=args.max_episode_steps)
        res_dim = ((state_dim if args.full_state else state_dim - env_state_dim)
                   + (common.TASK_FEATURE_DIM if args.task_features else 0)
                   + (SEARCH_FEATURE_DIM if args.search_features else 0))
        obs_dim = res_dim + (act_dim if args.residual_sees_base else 0)
        eval_base = common.make_base_policy(args.base, eval_envs, seed=args.seed)

        # ---- networks ----
        actor = Actor(obs_dim, act_dim, args.hidden_dim, args.init_std).to(device)
        qf1, qf2 = (SoftQNetwork(obs_dim, act_dim, args.hidden_dim, args.layer_norm).to(device) for _ in range(2))
        qf1_target, qf2_target = (SoftQNetwork(obs_dim, act_dim, args.hidden_dim, args.layer_norm).to(device)
                                  for _ in range(2))
        qf1_target.load_state_dict(qf1.state_dict()), qf2_target.load_state_dict(qf2.state_dict())
        online_params = list(qf1.parameters()) + list(qf2.parameters())
        target_params = list(qf1_target.parameters()) + list(qf2_target.parameters())  # loaded in place on resume
        q_optimizer = torch.optim.Adam(online_params, lr=args.q_lr)
        actor_params = list(actor.parameters())
        actor_optimizer = torch.optim.Adam(actor_params, lr=args.policy_lr)
        bc_actor = copy.deepcopy(actor).requires_grad_(False) if args.ibrl else None  # the BC policy, after BC
        actor_ema = copy.deepcopy(actor).requires_grad_(False) if args.eval_ema > 0 else None  # starts after BC
        eval_actor, ema_params = (actor, []) if actor_ema is None else (actor_ema, list(actor_ema.parameters()))
        alpha = torch.tensor(args.alpha, device=device)
        res_mask = torch.ones(act_dim, device=device)  # which action dimensions the residual may change
        if not args.residual_gripper:
            res_mask[-1] = 0.0

        def active(state):
            """(B, act_dim) multiplier of the residual: the masked dimensions, and only after contact if gated."""
            if args.gate_on_contact and args.search_features:
                return res_mask * (state[:, env_state_dim : env_state_dim + 1] > 0).float()
            return res_mask.expand(len(state), -1)
        obs_rms = common.RunningMeanStd(res_dim, device=device)

        def residual_state(state):
            """[s (with --full-state), the clock's columns, task features, search features]"""
            parts = [state if args.full_state else state[:, env_state_dim:]]
            if args.task_features:
                parts.append(common.task_features(state))
            if args.search_features:
                parts.append(search_features(state[:, :env_state_dim]))
            return torch.cat(parts, -1)

        def rl_obs(state, a_base, res_state=None):
            """s_RL = [normalised (s, task features, search features), a_base] (a_base is already in [-1, 1]);
            `res_state`: residual_state(state) if already computed."""
            s = obs_rms.normalize(residual_state(state) if res_state is None else res_state)
            return torch.cat([s, a_base], -1) if args.residual_sees_base else s

        eval_clock = SearchClock(args.num_eval_envs, device, args.search_features)

        def min_q(x, a_base, a_res, critics):
            """(B,) min(Q1, Q2) of the executed action a_base + scale * a_res."""
            action = common.compose_action(a_base, a_res, args.residual_scale)
            return torch.min(*(q(x, action) for q in critics))[:, 0]

        def ibrl_pick(x, a_base, on, a_rl, q_rl, critics):
            """IBRL's choice between the RL residual a_rl (valued q_rl, (B,)) and the frozen BC one: the higher of
            min(Q1, Q2) per row. Returns the chosen residual, its value and whether BC's was taken."""
            a_il = bc_actor(x)[0].tanh() * on
            q_il = min_q(x, a_base, a_il, critics)
            take_il = q_il > q_rl
            return torch.where(take_il[:, None], a_il, a_rl), torch.where(take_il, q_il, q_rl), take_il

        def deterministic_residual(obs, a_base):
            with torch.no_grad():
                state = eval_clock.observe(obs["state"].to(device))
                a_base, on = a_base.to(device), active(state)
                x = rl_obs(state, a_base)
                a_res = eval_actor(x)[0].tanh() * on
                if args.ibrl:
                    a_res = ibrl_pick(x, a_base, on, a_res, min_q(x, a_base, a_res, (qf1, qf2)), (qf1, qf2))[0]
            return torch.where(torch.isfinite(a_res), a_res, 0.0).to(obs["state"].device)

        deterministic_residual.reset = eval_clock.reset  # common.evaluate resets it with the episodes

        if ckpt:
            try:
                actor.load_state_dict(ckpt["actor"])
                obs_rms.load_state_dict(ckpt["obs_rms"])
                if actor_ema is not None:
                    actor_ema.load_state_dict(ckpt["actor_ema"])
                if args.ibrl:
                    bc_actor.load_state_dict(ckpt["bc_actor"])
                    qf1.load_state_dict(ckpt["qf1"]), qf2.load_state_dict(ckpt["qf2"])  # IBRL's eval needs them
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

        # ---- the demonstration buffer: replayed, relabelled against this base, with this reward ----
        t0 = time.perf_counter()
        demos = replay_demos(demo_meta, demo_actions, demo_labels, args.env_id, args.base, args.reward, args.demo_seed,
                             args.search_features, args.continue_after_success, reward_cfg)
        demo_rb = ReplayBuffer(len(demos["obs"]), state_dim, act_dim, 1, device)
        demo_rb.add(**{k: demos[k] for k in ReplayBuffer.FIELDS})
        demo_rb.data["label"] = demos["label"].to(device)  # sampled with its row: the BC term's target
        demo_obs, demo_base = demos["obs"].to(device), demos["a_base"].to(device)
        # BC target: the residual that turns the base's action into the demonstrator's (its clean one under DART)
        demo_target = ((demos["label"].to(device) - demo_base) / args.residual_scale).clamp(
            -BC_TARGET_MAX, BC_TARGET_MAX) * active(demo_obs)
        demo_stats = {"demos/episodes": len(demos["lengths"]), "demos/transitions": len(demos["obs"]),
                      "demos/mean_len": demos["lengths"].float().mean().item(),
                      "demos/residual_saturated": (demo_target.abs() >= BC_TARGET_MAX).float().mean().item(),
                      "time/demo_replay": time.perf_counter() - t0}
        print(f"demonstrations: {demo_stats['demos/episodes']} episodes, {demo_stats['demos/transitions']} "
              f"transitions from {demo_path}", flush=True)

        base = common.make_base_policy(args.base, envs, seed=args.seed)
        clock = SearchClock(args.num_envs, device, args.search_features)
        logger = common.Logger(run_name, args)
        ckpt_path = os.path.join(logger.dir, "ckpt.pt")
        rb = ReplayBuffer(min(args.buffer_size, max(args.total_timesteps, 1)), state_dim, act_dim, args.num_envs,
                          device)
        global_step, num_updates, update_debt = 0, 0, 0.0
        eval_base_stats = None
        if ckpt:
            qf1.load_state_dict(ckpt["qf1"]), qf2.load_state_dict(ckpt["qf2"])
            qf1_target.load_state_dict(ckpt["qf1_target"]), qf2_target.load_state_dict(ckpt["qf2_target"])
            q_optimizer.load_state_dict(ckpt["q_optimizer"]), actor_optimizer.load_state_dict(ckpt["actor_optimizer"])
            rb.load_state_dict(ckpt["rb"])
            global_step, num_updates, eval_base_stats = ckpt["global_step"], ckpt["num_updates"], ckpt["eval_base"]
            update_debt = ckpt["update_debt"]
            common.set_rng_state(ckpt["rng"])
            print(f"resumed {args.checkpoint} at step {global_step}")
        else:
            obs_rms.update(residual_state(demo_obs))  # normalise from the demonstrations until online data comes

        # ---- update functions ----
        n_demo = int(round(args.batch_size * args.demo_ratio))

        def sample(n_step):
            """RLPD's symmetric sampling: online rows and demonstration rows in one batch (demo rows last)."""
            b = rb.sample(args.batch_size - n_demo, n_step, args.gamma)
            if n_demo:
                d = demo_rb.sample(n_demo, n_step, args.gamma)
                b = {k: torch.cat([b[k], d[k]]) for k in b}
                b["demo_label"] = d["label"]
            return b

        def bc_loss(b):
            """|tanh(mean) - (a_demo - a_base) / scale|^2 on the batch's demonstration rows (a_demo: the label, the
            demonstrator's clean action under DART; the critic scores the executed one)."""
            x = rl_obs(b["obs"][-n_demo:], b["a_base"][-n_demo:])
            target = ((b["demo_label"] - b["a_base"][-n_demo:]) / args.residual_scale).clamp(
                -BC_TARGET_MAX, BC_TARGET_MAX)
            return ((actor(x)[0].tanh() - target) * active(b["obs"][-n_demo:])).pow(2).sum(-1).mean()

        def update_critic(b):
            with torch.no_grad():
                next_x = rl_obs(b["next_obs"], b["next_a_base"])
                next_res, next_log_pi, _ = actor.get_action(next_x)
                next_action = common.compose_action(b["next_a_base"], next_res * active(b["next_obs"]),
                                                   args.residual_scale)
                min_q_next = torch.min(qf1_target(next_x, next_action), qf2_target(next_x, next_action))
                soft_v_next = min_q_next - alpha * next_log_pi[:, None]
                if args.ibrl:  # bootstrap from the better of the RL and the BC action
                    soft_v_next = ibrl_pick(next_x, b["next_a_base"], active(b["next_obs"]), next_res,
                                            soft_v_next[:, 0], (qf1_target, qf2_target))[1][:, None]
                target = b["reward"] + (1 - b["terminated"]) * b["discount"] * soft_v_next
            x = rl_obs(b["obs"], b["a_base"])
            q1, q2 = qf1(x, b["action"]), qf2(x, b["action"])  # the critic scores the executed action
            qf1_loss, qf2_loss = F.mse_loss(q1, target), F.mse_loss(q2, target)
            q_optimizer.zero_grad()
            (qf1_loss + qf2_loss).backward()
            q_optimizer.step()
            return torch.stack([q1.mean(), q2.mean(), qf1_loss, qf2_loss]).detach()

        def update_actor(b, bc_coef):
            x = rl_obs(b["obs"], b["a_base"])
            a_res, log_pi, a_mean = actor.get_action(x)
            on = active(b["obs"])
            action = common.compose_action(b["a_base"], a_res * on, args.residual_scale)
            q = torch.min(qf1(x, action), qf2(x, action))[:, 0]
            # TD3+BC's normalisation: the critic's term in units of its own mean |Q|, so bc_coef means the same at
            # any reward scale and the actor cannot chase the critic's errors faster than the BC term holds it
            actor_loss = (alpha * log_pi - q).mean() / q.abs().mean().detach().clamp(min=1e-3)
            actor_loss = actor_loss + args.residual_l2 * (a_mean * on).pow(2).sum(-1).mean()
            bc = bc_loss(b) if n_demo else torch.zeros((), device=device)
            actor_optimizer.zero_grad()
            (actor_loss + bc_coef * bc).backward(inputs=actor_params)  # no gradients for the critics' weights
            actor_optimizer.step()
            if actor_ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, actor_params, 1.0 - args.eval_ema)
            return torch.stack([actor_loss, bc]).detach()

        def soft_update():
            with torch.no_grad():
                torch._foreach_lerp_(target_params, online_params, args.tau)

        def policy_step(state, a_base, res_state):
            """The residual to act with, and whether IBRL took the BC one (per env)."""
            with torch.no_grad():
                x, on = rl_obs(state, a_base, res_state), active(state)
                a_res = actor.get_action(x)[0] * on
                take_il = torch.zeros(len(state), dtype=torch.bool, device=device)
                if args.ibrl:
                    a_res, _, take_il = ibrl_pick(x, a_base, on, a_res, min_q(x, a_base, a_res, (qf1, qf2)),
                                                  (qf1, qf2))
            return torch.where(torch.isfinite(a_res), a_res, 0.0), take_il

        def bc_coef_at(step):
            if args.bc_decay_steps == 0:
                return 0.0
            return args.bc_coef * max(0.0, 1.0 - step / args.bc_decay_steps)

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
                  f"median steps to success {stats['median_steps_to_success']:.0f}, return {stats['return']:.2f} "
                  f"over {stats['episodes']} episodes", flush=True)

        def restart_envs():
            """Reset every train env with a seed derived from the step: a checkpoint taken here resumes exactly."""
            rb.end_episodes()
            obs = envs.reset(seed=args.seed + global_step, reconfigure=True)
            base.reset(torch.ones(args.num_envs, dtype=torch.bool, device=envs.device), seed=args.seed + global_step)
            clock.reset(torch.ones(args.num_envs, dtype=torch.bool))
            return clock.observe(obs["state"].to(device)), base(obs).to(device)

        def save():
            params = [p for net in (actor, qf1, qf2) for p in net.parameters()]
            if not torch.isfinite(losses).all() or not all(torch.isfinite(p).all() for p in params):
                raise FloatingPointError(f"non-finite loss or weights at step {global_step}")
            if args.save_model:
                common.save_checkpoint(ckpt_path, dict(
                    script="demo_explore_sac.py", base=args.base, args=vars(args), run_name=run_name,
                    demos=dict(path=demo_path, **demo_stats),
                    actor=actor.state_dict(), qf1=qf1.state_dict(), qf2=qf2.state_dict(),
                    qf1_target=qf1_target.state_dict(), qf2_target=qf2_target.state_dict(),
                    q_optimizer=q_optimizer.state_dict(), actor_optimizer=actor_optimizer.state_dict(),
                    obs_rms=obs_rms.state_dict(), rb=rb.state_dict(), global_step=global_step,
                    bc_actor=bc_actor.state_dict() if args.ibrl else None,
                    actor_ema=None if actor_ema is None else actor_ema.state_dict(),
                    num_updates=num_updates, update_debt=update_debt, eval_base=eval_base_stats,
                    rng=common.rng_state(),
                ))

        # ---- behaviour cloning on the demonstrations first (the "BC alone" baseline with --total-timesteps 0) ----
        losses = torch.zeros(6, device=device)
        if ckpt is None:
            logger.log(demo_stats, 0)
            for i in range(args.bc_pretrain_updates):
                idx = torch.randint(0, len(demo_obs), (args.batch_size,), device=device)
                x = rl_obs(demo_obs[idx], demo_base[idx])
                loss = ((actor(x)[0].tanh() - demo_target[idx]) * active(demo_obs[idx])).pow(2).sum(-1).mean()
                actor_optimizer.zero_grad()
                loss.backward()
                actor_optimizer.step()
                if (i + 1) % 500 == 0 or i + 1 == args.bc_pretrain_updates:
                    logger.log({"losses/bc_pretrain_loss": loss.item()}, i + 1 - args.bc_pretrain_updates)
            if args.ibrl:
                bc_actor.load_state_dict(actor.state_dict())  # frozen from here on
            if actor_ema is not None:
                actor_ema.load_state_dict(actor.state_dict())  # the average starts from the BC policy
            run_eval()
            save()
        if global_step >= args.total_timesteps:
            envs.close(), eval_envs.close(), logger.close()
            return

        # ---- training loop ----
        state, a_base = restart_envs()  # states carry the SearchClock column from here on
        env_device = envs.device
        ep_sums = torch.zeros(5, device=device)  # finished episodes: count, return, len, success_once, success_at_end
        term_sums = torch.zeros(len(common.REWARD_TERMS), device=device)
        norm_sums = torch.zeros(3, device=device)  # |a_base|, |scale * a_res|, IBRL's BC choices
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
                res_state = residual_state(state)  # once: for the normaliser and the policy
                obs_rms.update(res_state)
                a_res, took_bc = policy_step(state, a_base, res_state)  # the BC-initialised residual explores
                action = common.compose_action(a_base, a_res, args.residual_scale)
                norm_sums += torch.stack([a_base.norm(dim=-1).sum(), (args.residual_scale * a_res).norm(dim=-1).sum(),
                                          took_bc.float().sum()])
                envs.step_async(action.to(env_device))

                # ---- updates, while the CPU env workers simulate this step ----
                t_rollout += time.perf_counter() - t0
                t0 = time.perf_counter()
                if global_step >= max(args.learning_starts, 1):
                    if num_updates == 0:  # critic warm-up on online + demo data before the actor follows it
                        for _ in range(args.critic_warmup_updates):
                            update_critic(sample(args.n_step))
                            soft_update()
                    update_debt += args.utd * args.num_envs
                    bc_coef = bc_coef_at(global_step)
                    while update_debt >= 1:
                        update_debt -= 1
                        q_stats = update_critic(sample(args.n_step))
                        a_stats = update_actor(sample(1), bc_coef)
                        soft_update()
                        num_updates += 1
                        losses += torch.cat([q_stats, a_stats])
                        loss_count += 1
                t_update += time.perf_counter() - t0

                t0 = time.perf_counter()
                next_obs, reward, terminated, truncated, info = envs.step_wait()
                done = terminated | truncated
                base.reset(done)
                next_a_base = base(next_obs).to(device)
                done = done.to(device)
                final_state = clock.peek(info["final_obs"]["state"].to(device))
                clock.reset(done)
                next_state = clock.observe(next_obs["state"].to(device))  # = final_state where the episode goes on
                rb.add(obs=state, a_base=a_base, action=action, reward=reward.to(device), next_obs=final_state,
                       next_a_base=torch.where(done[:, None], a_base, next_a_base), terminated=terminated.to(device),
                       done=done)
                state, a_base = next_state, next_a_base
                global_step += args.num_envs

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
                    nb, nr, n_bc = (norm_sums / steps).tolist()
                    logs.update({"residual/base_action_norm": nb, "residual/residual_action_norm": nr})
                    if args.ibrl:
                        logs["residual/ibrl_bc_share"] = n_bc  # of the env steps, those that took BC's residual
                    if loss_count:
                        l = (losses / loss_count).tolist()
                        if not all(math.isfinite(v) for v in l):
                            raise FloatingPointError(f"non-finite loss at step {global_step}")
                        logs.update({"losses/qf1_value": l[0], "losses/qf2_value": l[1], "losses/qf1_loss": l[2],
                                     "losses/qf2_loss": l[3], "losses/qf_loss": (l[2] + l[3]) / 2,
                                     "losses/actor_loss": l[4], "losses/bc_loss": l[5],
                                     "losses/bc_coef": bc_coef_at(global_step), "losses/alpha": args.alpha})
                    sps = (global_step - steps_at_start) / (time.perf_counter() - t_start)
                    t_env = envs.sim_time - sim_time_at_start
                    env_sps = (global_step - steps_at_start) / t_env
                    logs.update({"charts/SPS": sps, "charts/env_SPS": env_sps, "charts/SPS_over_env_SPS": sps / env_sps,
                                 "charts/learning_rate": args.q_lr, "time/rollout": t_rollout,
                                 "time/update": t_update, "time/env": t_env})
                    logger.log(logs, global_step)
                    print(f"step {global_step}/{args.total_timesteps} | SPS {sps:.0f} ({sps / env_sps:.2f} of env) | "
                          f"train success_once {logs.get('train/success_once', float('nan')):.2f} return "
                          f"{logs.get('train/return', float('nan')):.2f} | |a_res| {nr:.3f}", flush=True)
                    ep_sums.zero_(), term_sums.zero_(), norm_sums.zero_(), losses.zero_()
                    loss_count = 0

                if global_step >= next_eval or global_step >= args.total_timesteps:
                    next_eval += args.eval_freq
                    t0 = time.perf_counter()
                    run_eval()
                    state, a_base = restart_envs()
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

    def _has_demos(path, num_demos):
        """Whether the cached default set exists with at least num_demos episodes."""
        try:
            with open(os.path.splitext(path)[0] + ".json") as f:
                return len(json.load(f)["episodes"]) >= num_demos and os.path.isfile(path)
        except (OSError, ValueError, KeyError):
            return False

    common.exit_on_config_error(main)
