"""Affordance-shaped residual PPO (paper section 3.2): ppo_residual.py plus a reward for touching the right part.

    r_t = R_staged + lambda_aff * r_aff,   r_aff = sum_i M_aff(i) exp(-|p_ee - p_i|^2 / (2 sigma^2)) / (2 pi sigma^2)

M_aff is an affordance map over one camera's pixels p_i (the graspable, functional part of the peg: its tail, where a
person would hold it; the head must go into the hole), p_ee the TCP projected into that image through the camera's
intrinsics and extrinsics. Dividing by 2 pi sigma^2 (the sum of the Gaussian over an unbounded pixel grid) makes r_aff
the fraction of the TCP's sigma-footprint in the image that lies on the affordance: 0 far away, ~1 with the TCP over
the middle of the mask (clipped at 1). With lambda_aff < 0.2 (the gap between the staged reward's stage-1 and stage-2
offsets) holding the tail always pays more than hovering over it, and every pre-success step still pays <= 0.

Affordance providers (--affordance):
  tail                     offline: peg pixels of ManiSkill's segmentation whose surface point (from depth, in the
                           peg's frame from its pose) lies on the tail half; stands in for a model trained on
                           egocentric human video.
  clipseg[:<hub id|dir>]   learned: text-prompted CLIPSeg through transformers (--aff-prompt, "the tail of the peg"),
                           from_pretrained of a hub id (default CIDAS/clipseg-rd64-refined) or a local folder.
  none                     no affordance term (lambda_aff = 0, nothing rendered): the same script as a baseline, with
                           the grasp measurements below.

Maps are rendered only when they must be: at each episode's reset (the peg rests until it is grasped). Each map pixel's
surface point is then stored in the peg's frame if it lies on the peg, else in the world, and re-projected every step,
so the map follows the peg once it is picked up without another frame (occlusions that arise later are ignored).
All of this runs inside each simulator (common.make_env's `wrapper`), batched on the GPU back end.

Measured, not assumed: at the first grasp of each episode (the simulator's is_grasping), whether the TCP is on the
tail half (peg-frame x < 0) and its distance from the tail's centre; logged as {train,eval}/grasp_rate (episodes with
a grasp), grasp_tail_frac (of those, on the tail) and grasp_tail_dist (m).

The residual, PPO and everything else are ppo_residual.py's (ResiP's recipe):

    a_t = clip(a_base + scale * tanh(u)),  u ~ N(mu([s_t, a_base]), sigma),  a_base = M_phi(v_theta(s_t, c))  (eq. 1)

    python affordance_ppo.py                                    # CPU, 2 envs, coarse base, tail affordance
    python affordance_ppo.py --affordance clipseg:CIDAS/clipseg-rd64-refined
    python affordance_ppo.py --num-envs 512 --num-steps 50      # GPU
    python affordance_ppo.py --evaluate --checkpoint runs/<run>/ckpt.pt

Logged: ppo_residual.py's keys, plus reward/affordance, train/{grasp_rate,grasp_tail_frac,grasp_tail_dist} and the
same under eval/ and eval_base/.
"""

import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common


@dataclass
class Args:
    # experiment
    exp_name: str = "affordance_ppo"
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
    num_eval_episodes: int = 100
    """episodes per evaluation (ManiSkill's protocol: full length, reconfigured)"""
    eval_freq: int = 50_000
    """evaluate (and checkpoint) every this many env steps (at the end of the iteration that crosses it)"""
    control_mode: str = "pd_ee_delta_pose"
    """the controller; the scripted bases need pd_ee_delta_pose"""
    sim_backend: str = "auto"
    """auto (GPU if CUDA is there), physx_cuda or physx_cpu"""
    reward: str = "staged"
    """staged (paper section 2.3), normalized_dense (ManiSkill's) or sparse"""
    total_timesteps: int = 500_000
    """total env steps"""
    max_episode_steps: Optional[int] = None
    """episode length of the training and eval envs (None: the task's, 100 steps for PegInsertionSide-v1);
    shorter only for quick runs and tests: success_at_end is defined at the task's limit"""

    # base policy and residual
    base: str = "coarse"
    """the frozen base: pi0:<hub id or folder>, expert, coarse[:key=value,...] or zero"""
    residual_scale: float = 0.1
    """bound of the residual in action units: a = clip(a_base + scale * tanh(u)) (ResiP, Policy Decorator)"""
    residual_sees_base: bool = True
    """whether the residual observes [s, a_base] (paper 2.1) rather than s alone"""
    task_features: bool = True
    """whether the residual also observes common.task_features(s): the head's offset from the hole axis, depth, tilt"""

    # affordance reward (paper section 3.2)
    affordance: str = "tail"
    """the affordance provider: tail (offline, segmentation + peg pose), clipseg[:<hub id or folder>] or none"""
    aff_coef: float = 0.1
    """lambda_aff: weight of r_aff in [0, 1] per step (< 0.2 keeps holding the tail better than hovering over it)"""
    aff_sigma: float = 3.0
    """sigma of the Gaussian around the projected TCP, in pixels of the affordance camera"""
    aff_prompt: str = "the tail of the peg"
    """the text prompt of a learned (CLIPSeg) provider"""
    aff_camera_size: int = 128
    """resolution of the affordance camera (the task's render_camera, also used by --capture-video)"""

    # algorithm
    num_steps: int = 500
    """steps per env per rollout (batch = num_envs * num_steps): 2 CPU envs need long rollouts for a usable batch"""
    gamma: float = 0.97
    """the discount factor (ManiSkill's PPO setting for this task)"""
    gae_lambda: float = 0.9
    """the lambda of generalised advantage estimation"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    anneal_lr: bool = False
    """whether to anneal the learning rate linearly to zero"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 10
    """epochs over each rollout"""
    norm_adv: bool = True
    """whether to normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """the PPO ratio clipping coefficient"""
    clip_vloss: bool = False
    """whether to clip the value loss like the policy's (off: Andrychowicz et al. 2021 found it does not help)"""
    ent_coef: float = 0.0
    """entropy bonus; zero because exploration is the (small) std itself, and a bonus would push it up"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""
    target_kl: Optional[float] = 0.05
    """stop an iteration's epochs once the approximate KL exceeds this: keeps the residual near the policy that
    collected the data, which matters more when a small std makes the ratio sharp (None: never stop)"""
    init_std: float = 0.3
    """initial std of the residual's pre-tanh Gaussian (scale * init_std in action units: ~3 mm per step here)"""
    fixed_std: bool = False
    """whether the std stays at init_std (ResiP: a fixed small std stops the entropy from collapsing or blowing up)"""
    norm_obs: bool = True
    """whether to normalise states with running statistics (saved in checkpoints)"""
    norm_reward: bool = True
    """whether to scale rewards by the running std of the discounted return (saved in checkpoints)"""
    hidden_dim: int = 256
    """width of the actor and critic MLPs"""

    # speed
    compile: bool = False
    """whether to torch.compile the update and policy functions"""
    threads: int = 1
    """torch threads of the learner when it runs on the CPU: the env workers are processes of their own, and a second
    learner thread that fights them for 2 cores made an update 2.3x slower (python benchmarks/update_threads.py)"""


ARCH_ARGS = ("env_id", "control_mode", "residual_scale", "residual_sees_base", "task_features",
             "hidden_dim", "norm_obs")
EPISODE_KEYS = ("return", "episode_len", "success_once", "success_at_end")
GRASP_KEYS = ("grasp/grasped", "grasp/on_tail", "grasp/tail_dist")
CLIPSEG_DEFAULT = "CIDAS/clipseg-rd64-refined"
AFF_CAMERA = "render_camera"  # the task's fixed third-person camera: its sensor camera looks over the peg's spawn
# area at the box, and pegs spawning almost under it fall out of view; a camera on the arm would need its pose per step


# ----------------------------------------------------------------------------------------------------------------------
# Affordance maps and the reward of paper eq. 2
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class View:
    """What a provider sees of B envs through one camera (H x W pixels)."""

    rgb: torch.Tensor  # (B, H, W, 3) uint8
    seg: torch.Tensor  # (B, H, W) per-scene segmentation ids
    xyz: torch.Tensor  # (B, H, W, 3) world position of each pixel's surface point (from depth)
    peg_id: torch.Tensor  # (B,) the peg's segmentation id
    peg_pose: torch.Tensor  # (B, 7) position, quaternion (wxyz)


class TailAffordance:
    """Offline provider: the peg's tail half. Peg pixels (segmentation) whose surface point, in the peg's frame, lies
    behind its centre (x < 0; peg x runs tail -> head). A stand-in for a map learned from egocentric human video."""

    def __call__(self, view: View) -> torch.Tensor:
        R = common.quaternion_to_matrix(view.peg_pose[:, 3:])
        x = ((view.xyz - view.peg_pose[:, None, None, :3]) * R[:, None, None, :, 0]).sum(-1)
        return ((view.seg == view.peg_id[:, None, None]) & (x < 0)).float()


class CLIPSegAffordance:
    """Learned provider: text-prompted segmentation with CLIPSeg (transformers), per-pixel sigmoid of its logits
    resized to the camera's resolution."""

    def __init__(self, path: str, prompt: str, device="cpu"):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        local = os.path.isdir(path)
        self.processor = CLIPSegProcessor.from_pretrained(path, local_files_only=local)
        self.model = CLIPSegForImageSegmentation.from_pretrained(path, local_files_only=local).eval().to(device)
        self.prompt, self.device = prompt, device

    @torch.no_grad()
    def __call__(self, view: View) -> torch.Tensor:
        B, H, W = view.seg.shape
        inputs = self.processor(text=[self.prompt] * B, images=list(view.rgb.cpu().numpy()), return_tensors="pt",
                                padding=True).to(self.device)
        logits = self.model(**inputs).logits
        logits = logits.reshape(B, 1, *logits.shape[-2:])  # CLIPSeg drops the batch dimension when B == 1
        return F.interpolate(logits.sigmoid(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]


def parse_affordance(spec: str) -> tuple[str, str]:
    """'tail' | 'none' | 'clipseg[:<hub id or folder>]' -> (kind, path); a clear error otherwise. A learned provider's
    config is read here, in the main process, so a bad path fails in one line before any simulator starts."""
    kind, _, path = spec.partition(":")
    if kind in ("tail", "none") and not path:
        return kind, ""
    if kind != "clipseg":
        raise common.ConfigError(f"unknown --affordance {spec!r}: choose tail, none or clipseg[:<hub id or folder>]")
    path = path or CLIPSEG_DEFAULT
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=os.path.isdir(path))
    except (OSError, ValueError) as err:
        raise common.ConfigError(f"--affordance {spec}: cannot load a model config from {path!r} "
                                 f"({str(err).splitlines()[0]})") from None
    if config.model_type != "clipseg":
        raise common.ConfigError(f"--affordance {spec}: {path!r} is a {config.model_type!r} model, not clipseg")
    return kind, path


def make_provider(spec: str, prompt: str, device="cpu"):
    kind, path = parse_affordance(spec)
    if kind == "none":
        return None
    return TailAffordance() if kind == "tail" else CLIPSegAffordance(path, prompt, device)


def project(points: torch.Tensor, extrinsic: torch.Tensor, intrinsic: torch.Tensor) -> torch.Tensor:
    """World points (B, N, 3) -> pixel coordinates (B, N, 2) as (u, v) = (column, row), pixel centres at +0.5
    (OpenCV camera: extrinsic (B, 3, 4) maps world to camera, intrinsic (B, 3, 3))."""
    cam = points @ extrinsic[:, :, :3].transpose(1, 2) + extrinsic[:, None, :, 3]
    uv = cam @ intrinsic.transpose(1, 2)
    return uv[..., :2] / uv[..., 2:3].clamp(min=1e-6)


def unproject(depth: torch.Tensor, extrinsic: torch.Tensor, intrinsic: torch.Tensor) -> torch.Tensor:
    """z-depth (B, H, W) in metres -> world points (B, H, W, 3) of the pixel centres; the inverse of project()."""
    B, H, W = depth.shape
    v, u = torch.meshgrid(torch.arange(H, device=depth.device) + 0.5, torch.arange(W, device=depth.device) + 0.5,
                          indexing="ij")
    K = intrinsic[:, None, None]
    x = (u - K[..., 0, 2]) / K[..., 0, 0] * depth
    y = (v - K[..., 1, 2]) / K[..., 1, 1] * depth
    cam = torch.stack([x, y, depth], -1)
    R, t = extrinsic[:, :, :3], extrinsic[:, :, 3]
    return (cam - t[:, None, None]) @ R[:, None]  # R^T (X_cam - t), row-vector form


def affordance_reward(p_ee: torch.Tensor, pixels: torch.Tensor, weights: torch.Tensor, sigma: float) -> torch.Tensor:
    """Paper eq. 2 for B envs: p_ee (B, 2) and map pixels (B, N, 2) with activations (B, N), normalised by the
    Gaussian's total mass 2 pi sigma^2: the fraction of the TCP's footprint on the affordance, in [0, 1]."""
    d2 = ((pixels - p_ee[:, None]) ** 2).sum(-1)
    return ((weights * torch.exp(-d2 / (2 * sigma**2))).sum(-1) / (2 * math.pi * sigma**2)).clamp(max=1.0)


def grasp_summary(means: dict) -> dict:
    """Per-episode means of the grasp/ measurements -> grasp_rate (episodes with a grasp), grasp_tail_frac and
    grasp_tail_dist (over the episodes with a grasp; NaN without any); the other entries pass through."""
    out = {k: v for k, v in means.items() if k not in GRASP_KEYS}
    g, tail, dist = (means[k] for k in GRASP_KEYS)
    out.update(grasp_rate=g, grasp_tail_frac=tail / g if g > 0 else float("nan"),
               grasp_tail_dist=dist / g if g > 0 else float("nan"))
    return out


class AffordanceWrapper(gym.Wrapper):
    """Inside each simulator (batched torch): adds aff_coef * r_aff to the reward (info["reward/affordance"]) and
    measures where the gripper first grasps the peg in each episode (info["grasp/..."]).

    The map is rendered at reset and kept as up to `max_points` weighted surface points, in the peg's frame for peg
    pixels and in the world for the rest; every step re-projects them with the peg's current pose.
    """

    def __init__(self, env, affordance: str, prompt: str, coef: float, sigma: float, camera: str = AFF_CAMERA,
                 max_points: int = 1024, min_weight: float = 0.01):
        super().__init__(env)
        self.single_observation_space, self.single_action_space = env.single_observation_space, env.single_action_space
        u = env.unwrapped
        self.device = u.device
        self.provider = make_provider(affordance, prompt, self.device)
        self.coef, self.sigma, self.camera, self.min_weight = coef, sigma, camera, min_weight
        B, N = u.num_envs, max_points
        self.points = torch.zeros(B, N, 3, device=self.device)  # peg frame (on_peg) or world
        self.on_peg = torch.zeros(B, N, dtype=torch.bool, device=self.device)
        self.weights = torch.zeros(B, N, device=self.device)
        self.extrinsic = torch.zeros(B, 3, 4, device=self.device)
        self.intrinsic = torch.eye(3, device=self.device).repeat(B, 1, 1)
        self.grasped = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.on_tail, self.tail_dist = torch.zeros(B, device=self.device), torch.zeros(B, device=self.device)

    def render_view(self) -> tuple[View, dict]:
        """One frame of the affordance camera for every env, with the camera's parameters."""
        u = self.env.unwrapped
        cam = u.scene.human_render_cameras[self.camera]
        u.scene.update_render(update_sensors=False, update_human_render_cameras=True)
        cam.capture()
        images = cam.get_obs(rgb=True, depth=True, position=False, segmentation=True)
        params = {k: v.to(self.device).float() for k, v in cam.get_params().items()}
        depth = images["depth"][..., 0].to(self.device).float() / 1000.0  # millimetres -> metres
        view = View(rgb=images["rgb"].to(self.device), seg=images["segmentation"][..., 0].to(self.device).long(),
                    xyz=unproject(depth, params["extrinsic_cv"], params["intrinsic_cv"]),
                    peg_id=u.peg.per_scene_id.to(self.device).long(), peg_pose=u.peg.pose.raw_pose.to(self.device))
        return view, params

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        env_idx = (kwargs.get("options") or {}).get("env_idx")
        mask = torch.ones(self.grasped.shape, dtype=torch.bool, device=self.device)
        if env_idx is not None:  # GPU partial reset
            mask = torch.zeros_like(mask)
            mask[torch.as_tensor(env_idx, device=self.device)] = True
        self.grasped[mask], self.on_tail[mask], self.tail_dist[mask] = False, 0.0, 0.0
        if self.provider is not None:
            view, params = self.render_view()
            m = self.provider(view).flatten(1)  # (B, H*W)
            w, idx = m.topk(self.weights.shape[1], dim=1)
            w = torch.where(w >= self.min_weight, w, 0.0)
            xyz = view.xyz.flatten(1, 2).gather(1, idx[..., None].expand(-1, -1, 3))
            on_peg = view.seg.flatten(1).gather(1, idx) == view.peg_id[:, None]
            R_peg, p_peg = common.quaternion_to_matrix(view.peg_pose[:, 3:]), view.peg_pose[:, None, :3]
            local = (xyz - p_peg) @ R_peg  # R^T (x - p): the peg's frame
            self.points[mask] = torch.where(on_peg[..., None], local, xyz)[mask]
            self.on_peg[mask], self.weights[mask] = on_peg[mask], w[mask]
            self.extrinsic[mask] = params["extrinsic_cv"][mask]
            self.intrinsic[mask] = params["intrinsic_cv"][mask]
        return obs, info

    def map_points(self, peg_pose=None) -> torch.Tensor:
        """The map's surface points in the world (B, N, 3), peg points moved with the peg's (current) pose."""
        peg = self.env.unwrapped.peg.pose.raw_pose.to(self.device) if peg_pose is None else peg_pose
        R_peg = common.quaternion_to_matrix(peg[:, 3:])
        return torch.where(self.on_peg[..., None], self.points @ R_peg.transpose(1, 2) + peg[:, None, :3], self.points)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        u = self.env.unwrapped
        peg = u.peg.pose.raw_pose.to(self.device)
        R_peg = common.quaternion_to_matrix(peg[:, 3:])
        p_tcp = u.agent.tcp.pose.p.to(self.device)
        if self.provider is not None:
            pixels = project(self.map_points(peg), self.extrinsic, self.intrinsic)
            p_ee = project(p_tcp[:, None], self.extrinsic, self.intrinsic)[:, 0]
            r_aff = self.coef * affordance_reward(p_ee, pixels, self.weights, self.sigma)
            reward = reward + r_aff.to(reward.device)
        else:
            r_aff = torch.zeros_like(self.on_tail)
        # the first grasp of the episode: on the tail half? how far from the tail's centre?
        grasping = u.agent.is_grasping(u.peg).to(self.device)
        x_tcp = ((p_tcp - peg[:, :3]) * R_peg[:, :, 0]).sum(-1)
        half_len = u.peg_half_sizes[:, 0].to(self.device)
        tail_centre = peg[:, :3] - 0.5 * half_len[:, None] * R_peg[:, :, 0]
        first = grasping & ~self.grasped
        self.on_tail = torch.where(first, (x_tcp < 0).float(), self.on_tail)
        self.tail_dist = torch.where(first, (p_tcp - tail_centre).norm(dim=-1), self.tail_dist)
        self.grasped = self.grasped | grasping
        info["reward/affordance"] = r_aff
        info["grasp/grasped"], info["grasp/on_tail"], info["grasp/tail_dist"] = (
            self.grasped.float(), self.on_tail, self.tail_dist)
        return obs, reward, terminated, truncated, info


def layer_init(layer, std=math.sqrt(2), bias=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """Gaussian residual over a pre-tanh action u, and a value function, both on s_RL = [normalised s, a_base]."""

    def __init__(self, obs_dim, act_dim, hidden, init_std, fixed_std):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, act_dim), std=0.0),  # exactly zero: the untrained residual is the base
        )
        self.actor_logstd = nn.Parameter(torch.full((1, act_dim), math.log(init_std)), requires_grad=not fixed_std)

    def get_value(self, x):
        return self.critic(x)[:, 0]

    def get_action_and_value(self, x, u=None):
        mean = self.actor_mean(x)
        std = self.actor_logstd.expand_as(mean).exp()
        dist = torch.distributions.Normal(mean, std, validate_args=False)  # NaN reaches the loss check
        if u is None:
            u = dist.sample()
        # PPO's ratio is taken on u; tanh(u) is part of the env's side (a fixed squashing shared by old and new policy)
        return u, dist.log_prob(u).sum(-1), dist.entropy().sum(-1), self.critic(x)[:, 0]


def compute_gae(rewards, values, next_values, terminated, dones, gamma, gae_lambda):
    """Generalised advantage estimation over a (T, B) rollout with partial resets.

    next_values[t] is V of the state reached after step t: the next step's start state, or the final observation
    when the episode ended at t. Termination (success) means no future: bootstrap with 0. Truncation (time limit)
    still has a future: bootstrap with V(final observation). Either way the advantage does not flow across an
    episode boundary (dones cuts the recursion).
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * (1.0 - terminated[t]) * next_values[t] - values[t]
        lastgaelam = delta + gamma * gae_lambda * (1.0 - dones[t]) * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


if __name__ == "__main__":

    def main():
        args = tyro.cli(Args)
        # ---- validate and derive ----
        for name in ("num_envs", "num_eval_envs", "num_eval_episodes", "eval_freq", "num_steps", "num_minibatches",
                     "update_epochs"):
            if getattr(args, name) < 1:
                raise common.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.residual_scale <= 0:
            raise common.ConfigError(f"--residual-scale must be > 0, got {args.residual_scale}")
        if args.init_std <= 0:
            raise common.ConfigError(f"--init-std must be > 0, got {args.init_std}")
        if args.aff_coef < 0:
            raise common.ConfigError(f"--aff-coef must be >= 0, got {args.aff_coef}")
        if args.aff_camera_size < 16:
            raise common.ConfigError(f"--aff-camera-size must be >= 16 pixels, got {args.aff_camera_size}")
        if args.aff_sigma <= 0:
            raise common.ConfigError(f"--aff-sigma must be > 0 (pixels), got {args.aff_sigma}")
        parse_affordance(args.affordance)  # a bad spec or model path fails here, in one line
        if args.total_timesteps < 0:
            raise common.ConfigError("--total-timesteps must be >= 0")
        batch_size = args.num_envs * args.num_steps
        if batch_size % args.num_minibatches:
            raise common.ConfigError(f"--num-envs * --num-steps ({batch_size}) must divide by --num-minibatches "
                                     f"({args.num_minibatches})")
        minibatch_size = batch_size // args.num_minibatches
        num_iterations = args.total_timesteps // batch_size
        if args.save_trajectories and not args.evaluate:
            raise common.ConfigError("--save-trajectories needs --evaluate --checkpoint C")
        if args.evaluate and not args.checkpoint:
            raise common.ConfigError("--evaluate needs --checkpoint C")
        if not args.evaluate:  # now, not after the evaluation envs have started
            common.check_num_envs(args.num_envs, args.sim_backend)
        images = common.base_needs_images(args.base)
        ckpt = common.load_checkpoint(args.checkpoint, "affordance_ppo.py", args.base) if args.checkpoint else None
        if ckpt:  # the policy is defined by these: take them from the checkpoint, whatever the command line says
            for name in ARCH_ARGS:
                setattr(args, name, ckpt["args"][name])
        run_name = ckpt["run_name"] if ckpt and not args.evaluate else f"{args.exp_name}__{args.seed}__{int(time.time())}"

        # ---- seed, device, envs ----
        common.seed_everything(args.seed, args.torch_deterministic)
        if args.threads < 1:
            raise common.ConfigError(f"--threads must be >= 1, got {args.threads}")
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        # The affordance term and the grasp measurements live in each simulator (see AffordanceWrapper).
        aff_env = dict(wrapper=functools.partial(AffordanceWrapper, affordance=args.affordance, prompt=args.aff_prompt,
                                                 coef=args.aff_coef, sigma=args.aff_sigma),
                       info_keys=("reward/affordance",) + GRASP_KEYS, episode_keys=GRASP_KEYS,
                       env_kwargs=dict(human_render_camera_configs={
                           AFF_CAMERA: dict(width=args.aff_camera_size, height=args.aff_camera_size)}))
        eval_envs = common.make_env(args.num_eval_envs, args.sim_backend, env_id=args.env_id,
                                    control_mode=args.control_mode, reward=args.reward, images=images,
                                    eval_mode=True, seed=args.seed + 10_000, record_dir=args.save_trajectories,
                                    video_dir=f"runs/{run_name}/videos" if args.capture_video else None,
                                    max_episode_steps=args.max_episode_steps, **aff_env)
        envs = None
        if not args.evaluate:
            envs = common.make_env(args.num_envs, args.sim_backend, env_id=args.env_id,
                                   control_mode=args.control_mode, reward=args.reward, images=images, seed=args.seed,
                                   max_episode_steps=args.max_episode_steps, **aff_env)
        act_dim, state_dim = eval_envs.action_dim, eval_envs.state_dim
        res_dim = state_dim + (common.TASK_FEATURE_DIM if args.task_features else 0)
        obs_dim = res_dim + (act_dim if args.residual_sees_base else 0)
        eval_base = common.make_base_policy(args.base, eval_envs, seed=args.seed)

        # ---- networks ----
        agent = Agent(obs_dim, act_dim, args.hidden_dim, args.init_std, args.fixed_std).to(device)
        optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate,
                                     eps=1e-5)
        obs_rms = common.RunningMeanStd(res_dim, device=device)
        return_rms = common.RunningMeanStd((), device=device)

        def rl_obs(state, a_base, res_state=None):
            """s_RL = [normalised (s, task features), a_base] (a_base is already in [-1, 1]); `res_state`: the
            (s, task features) part if already computed."""
            s = common.residual_state(state, args.task_features) if res_state is None else res_state
            s = obs_rms.normalize(s) if args.norm_obs else s
            return torch.cat([s, a_base], -1) if args.residual_sees_base else s

        def deterministic_residual(obs, a_base):
            with torch.no_grad():
                a_res = agent.actor_mean(rl_obs(obs["state"].to(device), a_base.to(device))).tanh()
            return torch.where(torch.isfinite(a_res), a_res, 0.0).to(a_base.device)

        if ckpt:
            try:
                agent.load_state_dict(ckpt["agent"])
                obs_rms.load_state_dict(ckpt["obs_rms"])
            except (RuntimeError, KeyError) as err:
                raise common.ConfigError(f"{args.checkpoint} does not fit this script's networks: "
                                         f"{str(err).splitlines()[0]}") from None

        if args.evaluate:
            trace = [] if args.save_trajectories else None
            stats = grasp_summary(common.evaluate(eval_envs, eval_base, args.num_eval_episodes, deterministic_residual,
                                                  args.residual_scale, seed=args.seed + 10_000, trace=trace))
            eval_envs.close()  # flushes the recordings
            if args.save_trajectories:
                stats["saved_episodes"] = common.keep_successful_trajectories(
                    args.save_trajectories, trace, args.num_eval_envs, args.residual_scale)
            print(json.dumps({f"eval/{k}": v for k, v in stats.items()}))
            return

        base = common.make_base_policy(args.base, envs, seed=args.seed)
        logger = common.Logger(run_name, args)
        ckpt_path = os.path.join(logger.dir, "ckpt.pt")
        global_step, iteration, eval_base_stats = 0, 0, None
        if ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            return_rms.load_state_dict(ckpt["return_rms"])
            global_step, iteration, eval_base_stats = ckpt["global_step"], ckpt["iteration"], ckpt["eval_base"]
            common.set_rng_state(ckpt["rng"])
            print(f"resumed {args.checkpoint} at step {global_step}")

        # ---- rollout storage on the training device ----
        b_shape = (args.num_steps, args.num_envs)
        obs_buf = torch.zeros(b_shape + (obs_dim,), device=device)
        u_buf = torch.zeros(b_shape + (act_dim,), device=device)
        logprobs, rewards, values, final_values, terminateds, dones = (torch.zeros(b_shape, device=device)
                                                                       for _ in range(6))

        # ---- pure update and policy functions (LeanRL style, so --compile can wrap them) ----
        def policy_step(x):
            with torch.no_grad():
                u, logprob, _, value = agent.get_action_and_value(x)
            return u, logprob, value

        def update(mb_obs, mb_u, mb_logprobs, mb_advantages, mb_returns, mb_values):
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_u)
            logratio = newlogprob - mb_logprobs
            ratio = logratio.exp()
            with torch.no_grad():  # http://joschu.net/blog/kl-approx.html
                old_approx_kl = (-logratio).mean()
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
            if args.norm_adv:
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
            pg_loss = torch.max(-mb_advantages * ratio,
                                -mb_advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
            if args.clip_vloss:
                v_clipped = mb_values + (newvalue - mb_values).clamp(-args.clip_coef, args.clip_coef)
                v_loss = 0.5 * torch.max((newvalue - mb_returns) ** 2, (v_clipped - mb_returns) ** 2).mean()
            else:
                v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()
            entropy_loss = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            return torch.stack([v_loss, pg_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac]).detach()

        if args.compile:
            policy_step, update = torch.compile(policy_step), torch.compile(update)

        def run_eval():
            nonlocal eval_base_stats
            t0 = time.perf_counter()
            if eval_base_stats is None:  # the base alone, once: the line the residual must beat
                eval_base_stats = grasp_summary(common.evaluate(eval_envs, eval_base, args.num_eval_episodes,
                                                                seed=args.seed + 10_000))
            stats = grasp_summary(common.evaluate(eval_envs, eval_base, args.num_eval_episodes, deterministic_residual,
                                                  args.residual_scale, seed=args.seed + 10_000))
            logger.log({f"eval/{k}": v for k, v in stats.items() if k != "episodes"}, global_step)
            logger.log({f"eval_base/{k}": v for k, v in eval_base_stats.items() if k != "episodes"}, global_step)
            logger.log({"time/eval": time.perf_counter() - t0}, global_step)
            print(f"step {global_step}: eval success_at_end {stats['success_at_end']:.2f} (base alone "
                  f"{eval_base_stats['success_at_end']:.2f}), success_once {stats['success_once']:.2f}, "
                  f"return {stats['return']:.2f}, grasps on the tail {stats['grasp_tail_frac']:.2f} (base alone "
                  f"{eval_base_stats['grasp_tail_frac']:.2f}) over {stats['episodes']} episodes", flush=True)

        def restart_envs():
            """Reset every train env with a seed derived from the step: a checkpoint taken here resumes exactly."""
            obs = envs.reset(seed=args.seed + global_step, reconfigure=True)
            base.reset(torch.ones(args.num_envs, dtype=torch.bool, device=envs.device), seed=args.seed + global_step)
            return obs, base(obs).to(device), torch.zeros(args.num_envs, device=device)

        def save():
            if not all(torch.isfinite(p).all() for p in agent.parameters()):
                raise FloatingPointError(f"non-finite weights at step {global_step}")
            if args.save_model:
                common.save_checkpoint(ckpt_path, dict(
                    script="affordance_ppo.py", base=args.base, args=vars(args), run_name=run_name,
                    agent=agent.state_dict(), optimizer=optimizer.state_dict(), obs_rms=obs_rms.state_dict(),
                    return_rms=return_rms.state_dict(), global_step=global_step, iteration=iteration,
                    eval_base=eval_base_stats, rng=common.rng_state(),
                ))

        # ---- training loop ----
        reward_keys = [f"reward/{k}" for k in common.REWARD_TERMS] * (args.reward == "staged") + ["reward/affordance"]
        obs, a_base, disc_return = restart_envs()  # disc_return: the discounted return the reward scale follows
        if ckpt is None:
            run_eval()
            save()  # a good checkpoint from the start, for --evaluate and for a run that diverges early
        env_device = envs.device
        next_eval = (global_step // args.eval_freq + 1) * args.eval_freq
        t_start, steps_at_start = time.perf_counter(), global_step
        t_rollout = t_update = 0.0
        sim_time_at_start = envs.sim_time
        # Ctrl-C asks the loop to stop at the end of the current iteration, where a checkpoint can resume exactly;
        # a second Ctrl-C interrupts at once.
        stop_requested = []
        signal.signal(signal.SIGINT, lambda *_: (stop_requested.append(True),
                                                 signal.signal(signal.SIGINT, signal.default_int_handler)))
        try:
            while iteration < num_iterations:
                iteration += 1
                if args.anneal_lr:
                    optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations)
                ep_sums = torch.zeros(1 + len(EPISODE_KEYS + GRASP_KEYS), device=device)  # count, then sums
                term_sums = torch.zeros(len(reward_keys), device=device)
                norm_sums = torch.zeros(2, device=device)  # |a_base|, |scale * a_res|

                # ---- rollout ----
                t0 = time.perf_counter()
                for step in range(args.num_steps):
                    state = obs["state"].to(device)
                    res_state = common.residual_state(state, args.task_features)
                    if args.norm_obs:
                        obs_rms.update(res_state)
                    x = rl_obs(state, a_base, res_state)
                    u, logprob, value = policy_step(x)
                    # A diverged policy must not send NaN to the simulator; the loss check below stops the run.
                    a_res = torch.where(torch.isfinite(u), u, 0.0).tanh()
                    action = common.compose_action(a_base, a_res, args.residual_scale)
                    next_obs, reward, terminated, truncated, info = envs.step(action.to(env_device))
                    done = terminated | truncated
                    base.reset(done)
                    next_a_base = base(next_obs).to(device)
                    reward, terminated, done = reward.to(device), terminated.to(device).float(), done.to(device)
                    if args.norm_reward:  # scale by the std of the discounted return (CleanRL's NormalizeReward)
                        disc_return = disc_return * args.gamma + reward
                        return_rms.update(disc_return)
                        disc_return = disc_return * (~done)
                        reward = reward / torch.sqrt(return_rms.var.float() + 1e-8)
                    obs_buf[step], u_buf[step], logprobs[step], values[step] = x, u, logprob, value
                    rewards[step], terminateds[step], dones[step] = reward, terminated, done.float()
                    # At an episode end the bootstrap value is V(final observation); the base is not queried there
                    # (a chunked VLA would spend a query on a state it never acts from): a_base stands in for a_base'.
                    # On a GPU it is computed for every env and masked, cheaper than a device sync on done.any(); on
                    # the CPU, where the check costs nothing, only at steps where an episode ended (~1 in 50).
                    final_values[step] = 0.0
                    if device.type != "cpu" or done.any():
                        with torch.no_grad():
                            final_x = rl_obs(info["final_obs"]["state"].to(device), a_base)
                            final_values[step] = torch.where(done, agent.get_value(final_x), 0.0)
                    # bookkeeping stays on the device: no .item() in the loop
                    d, ep = done.float(), info["episode"]
                    ep_sums += torch.stack([d.sum()] + [(ep[k].to(device).float() * d).sum()
                                                        for k in EPISODE_KEYS + GRASP_KEYS])
                    term_sums += torch.stack([info[k].to(device).sum() for k in reward_keys])
                    norm_sums += torch.stack([a_base.norm(dim=-1).sum(),
                                              (args.residual_scale * a_res).norm(dim=-1).sum()])
                    obs, a_base = next_obs, next_a_base
                global_step += batch_size
                t_rollout += time.perf_counter() - t0

                # ---- advantages: next_values[t] is V of the state reached after step t ----
                t0 = time.perf_counter()
                with torch.no_grad():
                    last_value = agent.get_value(rl_obs(obs["state"].to(device), a_base))
                    next_values = torch.where(dones.bool(), final_values, torch.cat([values[1:], last_value[None]]))
                    advantages, returns = compute_gae(rewards, values, next_values, terminateds, dones, args.gamma,
                                                      args.gae_lambda)

                # ---- update ----
                b_obs, b_u = obs_buf.reshape(batch_size, obs_dim), u_buf.reshape(batch_size, act_dim)
                b_logprobs, b_advantages, b_returns, b_values = (t.reshape(-1) for t in (logprobs, advantages,
                                                                                        returns, values))
                stats, num_mb = torch.zeros(6, device=device), 0
                for epoch in range(args.update_epochs):
                    b_inds = torch.randperm(batch_size, device=device)
                    for start in range(0, batch_size, minibatch_size):
                        mb = b_inds[start : start + minibatch_size]
                        stats += update(b_obs[mb], b_u[mb], b_logprobs[mb], b_advantages[mb], b_returns[mb],
                                        b_values[mb])
                        num_mb += 1
                    # one sync per epoch for early stopping, not one per minibatch
                    if args.target_kl is not None and stats[4] / num_mb > args.target_kl:
                        break
                t_update += time.perf_counter() - t0

                # ---- logging, once per iteration ----
                v_loss, pg_loss, entropy, old_kl, kl, clipfrac = (stats / num_mb).tolist()
                if not all(math.isfinite(v) for v in (v_loss, pg_loss, kl)):
                    raise FloatingPointError(f"non-finite loss at step {global_step}")
                var_y = b_returns.var()
                explained_var = (1 - (b_returns - b_values).var() / var_y).item() if var_y > 0 else float("nan")
                n, *ep_means = ep_sums.tolist()
                logs = {}
                if n > 0:
                    means = grasp_summary({k: v / n for k, v in zip(EPISODE_KEYS + GRASP_KEYS, ep_means)})
                    logs = {f"train/{k}": v for k, v in means.items()}
                logs.update({k: v / batch_size for k, v in zip(reward_keys, term_sums.tolist())})
                nb, nr = (norm_sums / batch_size).tolist()
                sps = (global_step - steps_at_start) / (time.perf_counter() - t_start)
                t_env = envs.sim_time - sim_time_at_start
                env_sps = (global_step - steps_at_start) / t_env  # throughput as a ratio within this run
                logs.update({
                    "losses/value_loss": v_loss, "losses/policy_loss": pg_loss, "losses/entropy": entropy,
                    "losses/old_approx_kl": old_kl, "losses/approx_kl": kl, "losses/clipfrac": clipfrac,
                    "losses/explained_variance": explained_var, "losses/epochs": epoch + 1,
                    "residual/base_action_norm": nb, "residual/residual_action_norm": nr,
                    "residual/std": agent.actor_logstd.exp().mean().item(),
                    "charts/SPS": sps, "charts/env_SPS": env_sps, "charts/SPS_over_env_SPS": sps / env_sps,
                    "charts/learning_rate": optimizer.param_groups[0]["lr"],
                    "time/rollout": t_rollout, "time/update": t_update, "time/env": t_env,
                })
                logger.log(logs, global_step)
                print(f"step {global_step}/{num_iterations * batch_size} | SPS {sps:.0f} ({sps / env_sps:.2f} of env) "
                      f"| train success_once {logs.get('train/success_once', float('nan')):.2f} return "
                      f"{logs.get('train/return', float('nan')):.2f} grasps on the tail "
                      f"{logs.get('train/grasp_tail_frac', float('nan')):.2f} | r_aff {logs['reward/affordance']:.3f} "
                      f"| |a_res| {nr:.3f} | kl {kl:.4f}", flush=True)

                if global_step >= next_eval or iteration == num_iterations:
                    next_eval = (global_step // args.eval_freq + 1) * args.eval_freq
                    t0 = time.perf_counter()
                    run_eval()
                    obs, a_base, disc_return = restart_envs()
                    save()
                    t_start += time.perf_counter() - t0  # SPS counts training time only
                if stop_requested:
                    print(f"interrupted at step {global_step}: saving {ckpt_path}", file=sys.stderr)
                    obs, a_base, disc_return = restart_envs()
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
