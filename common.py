"""What every residual-RL script here shares: the task, the frozen base policies, and the plumbing around them.

    a_t = clip(a_base + scale * a_res),   a_base = M_phi(v_theta(s_t, c)) (frozen),   a_res ~ pi_RL(. | [s_t, a_base])

Sections, top to bottom: environments (one call for the GPU and CPU back ends), the staged reward of the paper's
section 2.3, the frozen base policies (`pi0:<hub id or folder>`, `expert`, `coarse`, `zero`), residual composition,
evaluation on ManiSkill's protocol, checkpoints, seeding, logging and a running mean/std. No algorithm logic lives
here: losses, targets and update rules belong in each script, to be read and changed there.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import multiprocessing
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")  # lavapipe warns on every start without it

import mani_skill.envs  # noqa: E402,F401  (registers the ManiSkill tasks)
from mani_skill.utils.geometry.rotation_conversions import (  # noqa: E402
    axis_angle_to_matrix,
    matrix_to_axis_angle,
)

ENV_ID = "PegInsertionSide-v1"
INSTRUCTION = "insert the peg into the hole on the side of the box"
REWARD_TERMS = ("grasp", "orient", "insert", "success", "stage")


class ConfigError(ValueError):
    """Bad input from the user (flags, checkpoints, base specs): reported as one line, exit code 2."""


def exit_on_config_error(main: Callable[[], None]) -> None:
    """Run `main`; a ConfigError becomes `error: <message>` on stderr and exit code 2 instead of a traceback."""
    # A background job of a non-interactive shell starts with Ctrl-C ignored, which Python keeps; the training loops
    # take Ctrl-C over anyway, so restore it from the start (else `kill -INT` is lost until the first evaluation ends).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before a training loop took over Ctrl-C: nothing to save yet
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------------------------
# State layout of PegInsertionSide-v1 (obs_mode "state": agent qpos/qvel, then the task's extra observations)
# ----------------------------------------------------------------------------------------------------------------------
QPOS, QVEL, TCP_POSE, PEG_POSE = slice(0, 9), slice(9, 18), slice(18, 25), slice(25, 32)
PEG_HALF_SIZE, HOLE_POSE, HOLE_RADIUS = slice(32, 35), slice(35, 42), slice(42, 43)
STATE_DIM = 43


# ----------------------------------------------------------------------------------------------------------------------
# A variant with a hole the policy cannot see (paper section 3.1)
# ----------------------------------------------------------------------------------------------------------------------
HIDDEN_ENV_ID = "PegInsertionSideHidden-v1"
CONTACT_FORCE = slice(43, 46)  # the hidden variant's extra state: the peg-box contact force (N, world frame)


def _register_hidden_variant():
    import sapien
    from mani_skill.envs.tasks.tabletop.peg_insertion_side import PegInsertionSideEnv
    from mani_skill.utils.registration import register_env
    from mani_skill.utils.structs import Actor, Pose

    @register_env(HIDDEN_ENV_ID, max_episode_steps=200)
    class PegInsertionSideHiddenEnv(PegInsertionSideEnv):
        """PegInsertionSide-v1 with the hole behind an opaque panel and only a noisy estimate of it in the state.

        The state's box_hole_pose is the hole's pose moved by `hole_offset` = (min, max) metres (uniform radius,
        uniform direction) within the box face, drawn per episode; the true pose decides success and pays the staged
        reward (privileged_state), never reaches a policy. A visual-only panel covers the box face, so a camera sees
        the panel, not the hole (the peg passes through it). The state gains the peg-box contact force (3 values,
        newtons): the "force or tactile feedback" a search strategy can use. Episodes last 200 steps (time to search).
        """

        def __init__(self, *args, hole_offset=(0.01, 0.02), **kwargs):
            self.hole_offset = hole_offset
            super().__init__(*args, **kwargs)

        def _load_scene(self, options: dict):
            super()._load_scene(options)
            panels = []
            for i in range(self.num_envs):  # one per env: each box has its own size (2L x 2L face)
                L = float(self.peg_half_sizes[i, 0])
                builder = self.scene.create_actor_builder()
                builder.add_box_visual(half_size=[0.001, L, L], material=sapien.render.RenderMaterial(
                    base_color=[0.45, 0.45, 0.45, 1.0], roughness=0.8))
                builder.initial_pose = sapien.Pose(p=[0, 1, 0.1])
                builder.set_scene_idxs([i])
                panels.append(builder.build_kinematic(f"panel_{i}"))
                self.remove_from_state_dict_registry(panels[-1])
            self.panel = Actor.merge(panels, "panel")
            self.add_to_state_dict_registry(self.panel)
            self.hole_estimate_offsets = torch.zeros(self.num_envs, 3, device=self.device)

        def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
            super()._initialize_episode(env_idx, options)
            with torch.device(self.device):
                b = len(env_idx)
                lo, hi = self.hole_offset
                r = lo + (hi - lo) * torch.rand(b)
                angle = 2 * np.pi * torch.rand(b)
                self.hole_estimate_offsets[env_idx] = torch.stack(
                    [torch.zeros(b), r * torch.cos(angle), r * torch.sin(angle)], -1)
                face = torch.zeros(b, 3)
                face[:, 0] = -self.peg_half_sizes[env_idx, 0] - 0.0015  # just in front of the face the peg enters
                self.panel.set_pose(self.box.pose[env_idx] * Pose.create_from_pq(p=face))

        @property
        def hole_estimate_pose(self):
            return self.box_hole_pose * Pose.create_from_pq(p=self.hole_estimate_offsets)

        def privileged_state(self, state: torch.Tensor) -> torch.Tensor:
            """The state with the true hole pose in place of the estimate (for the reward, never for a policy)."""
            state = state.clone()
            state[:, HOLE_POSE] = self.box_hole_pose.raw_pose.to(state.device)
            return state

        def _get_obs_extra(self, info: dict):
            obs = super()._get_obs_extra(info)
            if self.obs_mode_struct.use_state:
                obs["box_hole_pose"] = self.hole_estimate_pose.raw_pose
                obs["box_hole_radius"] = self.box_hole_radii
                obs["peg_box_force"] = self.scene.get_pairwise_contact_forces(self.peg, self.box)
            return obs


_register_hidden_variant()


@functools.lru_cache(maxsize=None)
def _quaternion_consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rotation matrix of a quaternion (r, i, j, k), row-major: 1 - 2s(q_a q_a + q_b q_b) on the diagonal and
    2s(q_a q_b -/+ q_c q_d) off it, as indices into the flattened products q_m q_n (m * 4 + n), signs, diagonal."""
    idx = torch.tensor([[10, 6, 7, 6, 5, 11, 7, 11, 5], [15, 12, 8, 12, 15, 4, 8, 4, 10]], device=device)
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0], device=device)
    diag = torch.tensor([True, False, False, False, True, False, False, False, True], device=device)
    return idx, sign, diag


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) wxyz quaternions -> (..., 3, 3) rotation matrices, bit for bit what ManiSkill's (PyTorch3D's)
    quaternion_to_matrix returns, in 7 tensor ops instead of ~30: it runs several times per env step (task features,
    scripted bases, staged reward), where each small op's overhead, not its arithmetic, is the cost."""
    idx, sign, diag = _quaternion_consts(q.device)
    prods = (q[..., :, None] * q[..., None, :]).flatten(-2)[..., idx]  # (..., 2, 9)
    v = (2.0 / (q * q).sum(-1))[..., None] * (prods[..., 0, :] + sign.to(q.dtype) * prods[..., 1, :])
    return torch.where(diag, 1 - v, v).unflatten(-1, (3, 3))


# ----------------------------------------------------------------------------------------------------------------------
# Staged reward (paper section 2.3)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class StagedRewardConfig:
    """Coefficients of R = l1*R_grasp + l2*R_orient + l3*R_insert + R_success (one-hot stages, paper section 2.3).

    Scaled so that a step before success pays between about -1.2 and 0 and success pays 1: O(1) rewards suit the
    usual RL hyper-parameters.
    """

    a1: float = 0.1
    """R_grasp: weight of |p_gripper - p_peg_tail| (per metre)"""
    a2: float = 0.025
    """R_grasp: weight of the angle between the gripper and peg axes (per radian)"""
    b1: float = 0.025
    """R_grasp: bonus while the fingers hold the peg's tail (I_contact)"""
    b3: float = 0.25
    """R_grasp: weight of |g_width - g_optimal| (per metre; g_optimal is the peg's width)"""
    g1: float = 0.03
    """R_orient: weight of the angle between the peg axis and the hole normal (per radian)"""
    d1: float = 1.0
    """R_insert: weight of |p_peg_head - p_hole| (per metre), p_hole being the hole's entrance on the box face"""
    d2: float = 1.8
    """R_insert: weight of the insertion depth d_inserted (per metre; > d1, so pushing in pays)"""
    d3: float = 0.0
    """R_insert, our addition (0: the paper's formula): weight of the head's lateral distance from the hole axis (per
    metre, clipped at `lateral_clip`). Near the face d1's distance hardly sees a few mm of aim error (4 mm costs
    0.004 per step at d1 = 1), which is what a residual on an imprecise base has to fix"""
    lateral_clip: float = 0.02
    """d3's lateral distance is clipped here (metres), so far from the hole the term is a constant"""
    r_success: float = 1.0
    """R_success, returned alone on the step the peg is inserted"""
    stage_offsets: tuple[float, float, float] = (-1.0, -0.8, -0.1)
    """constant added in each stage (our addition): the paper's one-hot sum drops when a stage is reached (grasping
    ends the +b1 bonus, orienting starts at -g1*angle); offsets make every stage pay more than the one before it and
    keep all pre-success rewards negative, so ending the episode early by success is always preferred. Set (0, 0, 0)
    for the literal formula."""
    align_angle: float = 0.1
    """orient -> insert stage switch: peg-to-hole-axis angle below this (radians)"""
    tail_frac: float = 0.5
    """p_peg_tail = peg centre - tail_frac * half length along the peg axis (0.5: middle of the white tail half)"""


def staged_reward_terms(state, tail_contact, success, cfg) -> dict[str, torch.Tensor]:
    """Per-env staged reward terms from the state vector (poses of TCP, peg and hole, sizes, gripper) and flags.

    Stages (one-hot, success overrides them all): 1 grasp until the fingers hold the peg's tail; 2 orient while the
    held peg's axis is more than `align_angle` from the hole normal; 3 insert once it is aligned.
    """
    tcp, peg, hole = state[:, TCP_POSE], state[:, PEG_POSE], state[:, HOLE_POSE]
    half_len, peg_radius = state[:, PEG_HALF_SIZE][:, 0], state[:, PEG_HALF_SIZE][:, 1]
    rot = quaternion_to_matrix(torch.stack([tcp[:, 3:], peg[:, 3:], hole[:, 3:]], 1))  # (B, 3, 3, 3)
    v_gripper = rot[:, 0, :, 0]  # Panda TCP x: along the fingers' slot, parallel to a held peg
    v_peg = rot[:, 1, :, 0]  # peg x: tail -> head
    v_hole = rot[:, 2, :, 0]  # hole x: the insertion direction
    p_tail = peg[:, :3] - (cfg.tail_frac * half_len)[:, None] * v_peg
    p_head = peg[:, :3] + half_len[:, None] * v_peg
    # The parallel gripper is symmetric under a half turn about its approach axis, hence |v_gripper . v_peg|.
    grasp_angle = torch.arccos((v_gripper * v_peg).sum(-1).abs().clamp(max=1.0))
    r_grasp = (
        -cfg.a1 * (tcp[:, :3] - p_tail).norm(dim=-1)
        - cfg.a2 * grasp_angle
        + cfg.b1 * tail_contact.float()
        - cfg.b3 * (state[:, QPOS][:, 7:9].sum(-1) - 2 * peg_radius).abs()
    )
    orient_angle = torch.arccos((v_peg * v_hole).sum(-1).clamp(-1.0, 1.0))
    r_orient = -cfg.g1 * orient_angle
    # Head in the hole frame; the box (and so the hole) spans x in [-half_len, half_len], entered from -x. p_hole is
    # the entrance: seen from outside that is where the hole is, and a head jammed on the face then pays for its
    # lateral error directly (to the hole's centre, 4 mm of lateral error would change the distance by 0.1 mm).
    head_in_hole = ((p_head - hole[:, :3]).unsqueeze(1) @ rot[:, 2]).squeeze(1)
    in_bore = (head_in_hole[:, 1:].abs() <= state[:, HOLE_RADIUS]).all(-1)
    d_inserted = (head_in_hole[:, 0] + half_len).clamp(min=0.0) * in_bore
    p_entrance = hole[:, :3] - half_len[:, None] * v_hole
    lateral = head_in_hole[:, 1:].norm(dim=-1).clamp(max=cfg.lateral_clip)
    r_insert = -cfg.d1 * (p_head - p_entrance).norm(dim=-1) + cfg.d2 * d_inserted - cfg.d3 * lateral

    not_done = ~success
    l1 = not_done & ~tail_contact
    l2 = not_done & tail_contact & (orient_angle >= cfg.align_angle)
    l3 = not_done & tail_contact & (orient_angle < cfg.align_angle)
    c1, c2, c3 = cfg.stage_offsets
    return dict(
        grasp=l1 * r_grasp,
        orient=l2 * r_orient,
        insert=l3 * r_insert,
        success=success * cfg.r_success,
        stage=l1 * c1 + l2 * c2 + l3 * c3,
    )


def staged_reward(env, state: torch.Tensor, info: dict, cfg: StagedRewardConfig) -> dict[str, torch.Tensor]:
    """The staged reward of a (batched) PegInsertionSide env: poses from its state observation, contact from the
    simulator's finger-peg forces (both fingers press on the peg, on its tail (-x) half)."""
    if hasattr(env, "privileged_state"):  # a variant whose state holds only an estimate of the hole
        state = env.privileged_state(state)
    peg, tcp_p = state[:, PEG_POSE], state[:, TCP_POSE][:, :3]
    tcp_in_peg_x = (quaternion_to_matrix(peg[:, 3:])[:, :, 0] * (tcp_p - peg[:, :3])).sum(-1)
    tail_contact = env.agent.is_grasping(env.peg) & (tcp_in_peg_x < 0)
    return staged_reward_terms(state, tail_contact, info["success"], cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Environments: one call, batched torch tensors in and out, GPU (physx_cuda) or CPU (physx_cpu, one process per env)
# ----------------------------------------------------------------------------------------------------------------------
class TaskWrapper(gym.Wrapper):
    """Inside each simulator (batched torch): observations as {"state", ["rgb"]} and the chosen reward.

    `rgb` stacks all cameras as (B, n_cams, H, W, 3) uint8. With the staged reward, its terms go in
    info["reward/<term>"] so the training scripts can log them.
    """

    def __init__(self, env, reward: str, reward_cfg: StagedRewardConfig, images: bool):
        super().__init__(env)
        self.reward, self.reward_cfg, self.images = reward, reward_cfg, images
        base = env.unwrapped
        spaces = {"state": base.single_observation_space["state"] if images else base.single_observation_space}
        if images:
            cams = base.single_observation_space["sensor_data"]
            h, w = next(iter(cams.values()))["rgb"].shape[:2]
            spaces["rgb"] = gym.spaces.Box(0, 255, (len(cams), h, w, 3), np.uint8)
        self.single_observation_space = gym.spaces.Dict(spaces)
        self.observation_space = self.single_observation_space  # per-env view; the CPU workers hold one env each
        self.single_action_space = base.single_action_space

    def _obs(self, obs):
        if not self.images:
            return {"state": obs}
        rgb = torch.stack([cam["rgb"] for cam in obs["sensor_data"].values()], 1)
        return {"state": obs["state"], "rgb": rgb}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._obs(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.reward == "staged":
            state = obs["state"] if self.images else obs
            terms = staged_reward(self.env.unwrapped, state, info, self.reward_cfg)
            reward = sum(terms.values())
            info.update({f"reward/{k}": v for k, v in terms.items()})
        return self._obs(obs), reward, terminated, truncated, info


class _CPUWorker(gym.Wrapper):
    """One physx_cpu env in its own process: numpy, unbatched, as gymnasium's AsyncVectorEnv expects."""

    def __init__(self, env, ignore_terminations: bool, info_keys: tuple = ()):
        super().__init__(env)
        self.ignore_terminations, self.info_keys = ignore_terminations, tuple(info_keys)
        self.observation_space = env.single_observation_space
        self.action_space = env.single_action_space

    def reset(self, *, seed=None, options=None):
        t0 = time.perf_counter()
        obs, _ = self.env.reset(seed=seed, options=options)
        return {k: v[0].cpu().numpy() for k, v in obs.items()}, {"reset_time": time.perf_counter() - t0}

    def step(self, action):
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.step(torch.as_tensor(action)[None])
        keep = ["success"] + [k for k in info if k.startswith("reward/") or k in self.info_keys]
        info = {k: info[k][0].item() for k in keep}
        info["sim_time"] = time.perf_counter() - t0
        terminated = False if self.ignore_terminations else bool(terminated[0])
        obs = {k: v[0].cpu().numpy() for k, v in obs.items()}
        return obs, float(reward[0]), terminated, bool(truncated[0]), info


def _make_maniskill(env_id, num_envs, sim_backend, control_mode, images, camera_size, reward, reward_cfg, reconf,
                    record_dir=None, video_dir=None, wrapper=None, env_kwargs=None, rank=0):
    kwargs = dict(
        num_envs=num_envs,
        obs_mode="state+rgb" if images else "state",
        control_mode=control_mode,
        sim_backend=sim_backend,
        reward_mode="normalized_dense" if reward == "normalized_dense" else "sparse",
        reconfiguration_freq=reconf,
        render_mode="rgb_array" if images else None,
        render_backend="gpu" if torch.cuda.is_available() else "sapien_cpu",  # lavapipe on CPU-only machines
        # Without it, resets after the first draw from torch's *global* RNG (our training RNG on the GPU path).
        enhanced_determinism=True,
    )
    if images:
        kwargs["sensor_configs"] = dict(width=camera_size, height=camera_size)
    if video_dir:
        kwargs["render_mode"] = "rgb_array"
    env = gym.make(env_id, **kwargs, **(env_kwargs or {}))
    if record_dir or video_dir:
        from mani_skill.utils.wrappers.record import RecordEpisode

        if record_dir:  # ManiSkill's trajectory format; keep_successful_trajectories() merges and filters it
            env = RecordEpisode(env, record_dir, trajectory_name=f"env{rank}", save_video=False,
                                source_type="rl", source_desc="frozen base policy + residual RL policy")
        if video_dir:
            env = RecordEpisode(env, video_dir, save_trajectory=False, video_fps=20, max_steps_per_video=None,
                                trajectory_name=f"env{rank}")
    env = TaskWrapper(env, reward, reward_cfg, images)
    return wrapper(env) if wrapper else env


def _start_forkserver() -> None:
    """Start multiprocessing's forkserver with torch, ManiSkill, this module and the running script imported once, so
    that every CPU env worker is a fork that already has them. Its own preload cannot: on Python 3.11-3.13 the
    "__main__" entry is silently skipped (the server looks for a 'main_path' key that the preparation data does not
    have) and the parent's sys.path is dropped, so other preloads fail to import, also silently; each worker then
    ran the script afresh, imports and all (~4 s of CPU per worker). Here the server gets the folders on PYTHONPATH
    and imports the script under its module name; a worker still re-runs the script's top level to rebuild
    __main__ (what `wrapper` classes defined there unpickle from), but finds its imports done."""
    from multiprocessing import forkserver

    folders, preload = [os.path.dirname(os.path.abspath(__file__))], [__name__]
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    if main_file and main_file.endswith(".py") and getattr(sys.modules["__main__"], "__spec__", None) is None:
        folders.append(os.path.dirname(os.path.abspath(main_file)))  # `python script.py`, not `python -m ...`
        preload.append(os.path.splitext(os.path.basename(main_file))[0])
    multiprocessing.set_forkserver_preload(preload)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(folders + ([old] if old else []))
    try:
        forkserver.ensure_running()  # a no-op once it runs
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def _cpu_worker(ignore_terminations, info_keys, make_kwargs, rank):
    if multiprocessing.parent_process() is not None:  # gymnasium also calls this in the script, for the spaces
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training script's (it saves, then closes us)
    torch.set_num_threads(1)  # one core per simulator process: two envs use both cores of a 2-core machine
    return _CPUWorker(_make_maniskill(**make_kwargs, rank=rank), ignore_terminations, info_keys)


class VecEnv:
    """Batched env with torch tensors in and out on either back end, and ManiSkill's same-step partial resets.

    step() returns (obs, reward, terminated, truncated, info). `info["final_obs"]` is the true next observation
    (the terminal one where an episode just ended, else equal to obs) for bootstrapping; where `terminated |
    truncated`, `info["episode"]` holds that episode's return, episode_len, success_once, success_at_end and
    success_step (the step of its first success, NaN if none).
    step() is step_async() then step_wait(): on the CPU back end the worker processes simulate between the two, so a
    learner can run its update meanwhile. `sim_time` adds up the simulator's own time per step (CPU: the slowest
    worker's env.step and, where its episode ended, its auto-reset; GPU: the step call, which resets too), the "raw
    env steps/s" that training throughput is measured against.
    `info_keys` are further per-step scalars of the simulator's info passed through as floats; those also in
    `episode_keys` join info["episode"] with their value at the episode's last step.
    """

    def __init__(self, env_id, num_envs, sim_backend, control_mode, images, camera_size, reward, reward_cfg,
                 ignore_terminations, seed, reconfiguration_freq, record_dir=None, video_dir=None, wrapper=None,
                 info_keys=(), episode_keys=(), env_kwargs=None):
        self.num_envs, self.seed = num_envs, seed
        self.gpu = sim_backend == "physx_cuda"
        make_kwargs = dict(env_id=env_id, sim_backend=sim_backend, control_mode=control_mode, images=images,
                           camera_size=camera_size, reward=reward, reward_cfg=reward_cfg, reconf=reconfiguration_freq,
                           record_dir=record_dir, video_dir=video_dir, wrapper=wrapper, env_kwargs=env_kwargs)
        if self.gpu:
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

            env = _make_maniskill(num_envs=num_envs, **make_kwargs)
            self.envs = ManiSkillVectorEnv(env, num_envs, auto_reset=True,
                                           ignore_terminations=ignore_terminations)
            self.device = self.envs.device
            self.single_observation_space = env.single_observation_space
        else:
            fns = [
                functools.partial(_cpu_worker, ignore_terminations, info_keys, dict(make_kwargs, num_envs=1), i)
                for i in range(num_envs)
            ]
            # forkserver: one server process imports torch, ManiSkill and this module once; every worker is then a
            # fork of it (~1 s) rather than a fresh interpreter importing them again (spawn: ~4 s, and as long
            # again to shut down). Not plain fork: the learner has torch threads running by now.
            _start_forkserver()
            self.envs = gym.vector.AsyncVectorEnv(
                fns, context="forkserver", autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
            )
            self.device = torch.device("cpu")
            self.single_observation_space = self.envs.single_observation_space
        self.max_episode_steps = (env_kwargs or {}).get("max_episode_steps") or gym.spec(env_id).max_episode_steps
        self.single_action_space = self.envs.single_action_space
        self.action_dim = self.single_action_space.shape[0]
        self.state_dim = self.single_observation_space["state"].shape[0]
        self.images, self.control_mode = images, control_mode
        self._info_keys = (["success"] + ([f"reward/{t}" for t in REWARD_TERMS] if reward == "staged" else [])
                           + list(info_keys))
        self._episode_keys = tuple(episode_keys)
        self._returns = torch.zeros(num_envs, device=self.device)
        self._lengths = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self._success_once = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        self._success_step = torch.full((num_envs,), torch.nan, device=self.device)
        self.sim_time, self._action = 0.0, None

    def reset(self, seed: Optional[int] = None, reconfigure: bool = False):
        """Reset all envs; env i is seeded with seed + i (then follows its own RNG) for reproducible episodes.

        `reconfigure` rebuilds the scenes, which also clears the physics engine's caches: after it, the same seed gives
        bit-identical episodes on the CPU back end however the envs were used before (what exact resume needs).
        """
        seed = self.seed if seed is None else seed
        self._returns, self._lengths, self._success_once = (
            torch.zeros_like(self._returns), torch.zeros_like(self._lengths), torch.zeros_like(self._success_once))
        self._success_step = torch.full_like(self._success_step, torch.nan)
        seeds = [seed + i for i in range(self.num_envs)]
        obs, _ = self.envs.reset(seed=seeds, options={"reconfigure": True} if reconfigure else None)
        return obs if self.gpu else {k: torch.from_numpy(v) for k, v in obs.items()}

    def step(self, action: torch.Tensor):
        self.step_async(action)
        return self.step_wait()

    def step_async(self, action: torch.Tensor) -> None:
        if self.gpu:
            self._action = action
        else:
            self.envs.step_async(action.cpu().numpy())

    def step_wait(self):
        if self.gpu:
            t0 = time.perf_counter()
            obs, reward, terminated, truncated, info = self.envs.step(self._action)
            self.sim_time += time.perf_counter() - t0
            # After an auto-reset ManiSkillVectorEnv keeps the step's own (pre-reset) obs and info for all envs here.
            final_obs = info.get("final_observation", obs)
            step_info = info.get("final_info", info)
            step_info = {k: step_info[k] for k in self._info_keys}
        else:
            obs, reward, terminated, truncated, info = self.envs.step_wait()
            obs = {k: torch.from_numpy(v) for k, v in obs.items()}
            reward, terminated, truncated = (torch.from_numpy(x) for x in (reward, terminated, truncated))
            reward = reward.float()
            done = (terminated | truncated).numpy()
            # gymnasium's same-step autoreset: envs that just ended report their last step under "final_info"
            # and their terminal observation under "final_obs"; the others report theirs directly.
            final_info = info.get("final_info", {})
            step_info = {
                k: torch.from_numpy(np.where(done, final_info[k], info[k]) if k in info and k in final_info
                                    else final_info[k] if k in final_info else info[k])
                for k in self._info_keys + ["sim_time"]
            }
            sim_time = step_info.pop("sim_time").numpy()
            if "reset_time" in info:  # an env that ended was reset in its worker, as part of this step
                sim_time = sim_time + np.where(info["_reset_time"], info["reset_time"], 0.0)
            self.sim_time += float(sim_time.max())
            final_obs = obs
            if done.any():
                final_obs = {k: v.clone() for k, v in obs.items()}
                for i in np.flatnonzero(done):
                    for k, v in info["final_obs"][i].items():
                        final_obs[k][i] = torch.from_numpy(v)
        done = terminated | truncated
        success = step_info.pop("success").bool()
        out = {k: v.float() for k, v in step_info.items()}
        # The running sums are replaced, not modified in place, so `episode` can hand out the old tensors as they are.
        self._returns, self._lengths = self._returns + reward, self._lengths + 1
        # the step (1-based) of the episode's first success; NaN while it has not succeeded
        self._success_step = torch.where(success & ~self._success_once, self._lengths.float(), self._success_step)
        self._success_once = self._success_once | success
        out["success"], out["final_obs"] = success, final_obs
        out["episode"] = {"return": self._returns, "episode_len": self._lengths, "success_once": self._success_once,
                          "success_at_end": success, "success_step": self._success_step,
                          **{k: out[k] for k in self._episode_keys}}
        live = ~done
        self._returns, self._lengths, self._success_once = (
            self._returns * live, self._lengths * live, self._success_once & live)
        self._success_step = torch.where(live, self._success_step, torch.nan)
        return obs, reward, terminated, truncated, out

    def close(self):
        self.envs.close()


def resolve_sim_backend(sim_backend: str) -> str:
    if sim_backend == "auto":
        return "physx_cuda" if torch.cuda.is_available() else "physx_cpu"
    if sim_backend in ("gpu", "physx_cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--sim-backend {sim_backend} needs CUDA, which this machine lacks; use physx_cpu")
        return "physx_cuda"
    if sim_backend in ("cpu", "physx_cpu"):
        return "physx_cpu"
    raise ConfigError(f"unknown --sim-backend {sim_backend!r}: choose auto, physx_cuda (gpu) or physx_cpu (cpu)")


REWARDS = ("staged", "normalized_dense", "sparse")


def check_reward(reward: str) -> None:
    """make_env checks this itself; a script that starts processes of its own before its envs calls it first."""
    if reward not in REWARDS:
        raise ConfigError(f"unknown --reward {reward!r}: choose {', '.join(REWARDS[:-1])} or {REWARDS[-1]}")


def check_num_envs(num_envs: int, sim_backend: str = "auto") -> str:
    """The back end `sim_backend` resolves to, once `num_envs` is known to suit it (one process per env on the CPU
    back end: at most two per core). make_env checks this itself; scripts call it first, so that a bad --num-envs
    fails before their evaluation envs start."""
    if num_envs < 1:
        raise ConfigError(f"--num-envs must be >= 1, got {num_envs}")
    backend = resolve_sim_backend(sim_backend)
    max_cpu_envs = 2 * (os.cpu_count() or 1)
    if backend == "physx_cpu" and num_envs > max_cpu_envs:
        raise ConfigError(
            f"--num-envs {num_envs} on the CPU back end would start {num_envs} simulator processes on "
            f"{os.cpu_count()} cores; use --num-envs {os.cpu_count()} here (up to {max_cpu_envs}), or a GPU "
            f"(--sim-backend physx_cuda) for hundreds of envs"
        )
    return backend


def make_env(
    num_envs: int,
    sim_backend: str = "auto",
    *,
    env_id: str = ENV_ID,
    control_mode: str = "pd_ee_delta_pose",
    reward: str = "staged",
    reward_cfg: Optional[StagedRewardConfig] = None,
    images: bool = False,
    camera_size: int = 64,
    eval_mode: bool = False,
    max_episode_steps: Optional[int] = None,
    ignore_terminations: Optional[bool] = None,
    seed: int = 0,
    reconfiguration_freq: Optional[int] = None,
    record_dir: Optional[str] = None,
    video_dir: Optional[str] = None,
    wrapper: Optional[Callable[[gym.Env], gym.Env]] = None,
    info_keys: tuple[str, ...] = (),
    episode_keys: tuple[str, ...] = (),
    env_kwargs: Optional[dict] = None,
) -> VecEnv:
    """Train (`eval_mode=False`: partial resets, episodes end on success) or eval envs (ManiSkill's protocol:
    reconfigure every episode, no early termination, so success_at_end means what it says).

    Peg and box sizes change only on reconfiguration. GPU train envs keep ManiSkill's default of never
    reconfiguring (num_envs different geometries); CPU train envs reconfigure every 10th episode, as one rebuild
    costs about as much as 25 steps. `record_dir` records every episode in ManiSkill's trajectory format (one file
    per CPU env; see keep_successful_trajectories), `video_dir` saves a video per episode. `wrapper(env)` wraps each
    simulator (batched torch, inside the worker process on the CPU back end, so it must pickle): a script's own
    reward term or measurement, reporting through `info_keys` / `episode_keys` (see VecEnv). `env_kwargs` go to
    gym.make as they are (e.g. camera configs). `ignore_terminations` (default: `eval_mode`) keeps episodes going
    after success until the time limit, as the evaluation does; training envs may ask for it too.
    `max_episode_steps` overrides the task's time limit (PegInsertionSide-v1: 100 steps); quick runs and tests only,
    as success_at_end is defined at the task's limit.
    """
    check_reward(reward)
    if max_episode_steps is not None:
        if max_episode_steps < 1:
            raise ConfigError(f"--max-episode-steps must be >= 1, got {max_episode_steps}")
        env_kwargs = dict(env_kwargs or {}, max_episode_steps=max_episode_steps)
    backend = check_num_envs(num_envs, sim_backend)
    if reconfiguration_freq is None:
        reconfiguration_freq = 1 if eval_mode else (0 if backend == "physx_cuda" else 10)
    if ignore_terminations is None:
        ignore_terminations = eval_mode
    return VecEnv(env_id, num_envs, backend, control_mode, images, camera_size, reward,
                  reward_cfg or StagedRewardConfig(), ignore_terminations, seed, reconfiguration_freq, record_dir,
                  video_dir, wrapper, info_keys, episode_keys, env_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Frozen base policies: a_base for a batch of observations, and a reset hook for per-env caches
# ----------------------------------------------------------------------------------------------------------------------
class BasePolicy:
    """Interface: `__call__(obs) -> a_base (B, action_dim)` in [-1, 1]; `reset(mask)` after those envs reset.

    Bases are frozen: they hold no trainable parameters and run without gradients.
    """

    action_dim: int = 7
    needs_images: bool = False

    def reset(self, mask: torch.Tensor, seed: Optional[int] = None) -> None:
        """Clear the per-env caches of envs in `mask`; a seed also re-seeds the base's own RNG (if it has one)."""

    def __call__(self, obs: dict) -> torch.Tensor:
        raise NotImplementedError

    def _init_caches(self, num_envs: int) -> None:
        self.num_envs = num_envs

    def resized(self, num_envs: int) -> "BasePolicy":
        """The same frozen base (models shared, not copied) with fresh per-env caches for `num_envs` envs."""
        other = copy.copy(self)
        other._init_caches(num_envs)
        return other


class ZeroBase(BasePolicy):
    """a_base = 0: a residual script becomes plain RL from scratch (the baseline to beat)."""

    def __init__(self, action_dim: int):
        self.action_dim = action_dim

    def __call__(self, obs):
        return torch.zeros(obs["state"].shape[0], self.action_dim, device=obs["state"].device)


class PI0Base(BasePolicy):
    """A frozen VLA, a_base = M_phi(v_theta(s, c)), through transformers' PI0ForConditionalGeneration.

    The folder (or hub id) is a plain `save_pretrained` of the model and its tokenizer. Beside it, an optional
    `action_stats.json` {"mean": [...], "std": [...]} (PI0Processor's mean/std scheme; `processor_config.json`'s
    `actions_mean/actions_std` also work) un-normalises actions; without one, actions are used as they come.
    Action chunking: each env executes `chunk_steps` actions of a predicted chunk, then the model is queried again
    (also right after the env resets), in one batch over just the envs that need it. The flow-matching noise is one
    fixed seeded tensor, so a_base is a deterministic function of the observation at query time.
    """

    needs_images = True

    def __init__(self, path, action_dim, num_envs, device, chunk_steps=None, instruction=INSTRUCTION, seed=0):
        try:
            from transformers import AutoTokenizer, PI0ForConditionalGeneration
        except ImportError:
            raise ConfigError("--base pi0 needs a transformers release with PI0 (5.24 is tested)") from None
        local = os.path.isdir(path)
        if not local and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise ConfigError(f"PI0 checkpoint folder not found: {path}")
        try:
            self.model = PI0ForConditionalGeneration.from_pretrained(path).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # missing files, corrupt weights, an unknown hub id: all "cannot load"
            raise ConfigError(f"could not load PI0 from {path}: {(str(err) or type(err).__name__).splitlines()[0]}") from None
        self.model.requires_grad_(False)  # frozen: never trained, never in an optimizer
        cfg, vision = self.model.config, self.model.config.vlm_config.vision_config
        if cfg.max_action_dim < action_dim:
            raise ConfigError(f"PI0 at {path} outputs {cfg.max_action_dim}-dim actions; the env needs {action_dim}")
        self.action_dim, self.device = action_dim, torch.device(device)
        self.chunk_steps = chunk_steps or cfg.chunk_size
        if not 1 <= self.chunk_steps <= cfg.chunk_size:
            raise ConfigError(f"PI0 chunk_steps must be in [1, {cfg.chunk_size}], got {self.chunk_steps}")
        self.image_size, self.max_state_dim = vision.image_size, cfg.max_state_dim
        # PI0Processor's prompt: <image> x tokens-per-image per camera, <bos>, instruction, "\n" (tokenised once).
        self.image_tokens = torch.full(((vision.image_size // vision.patch_size) ** 2,), cfg.vlm_config.image_token_id)
        text = self.tokenizer(instruction + "\n", add_special_tokens=False)["input_ids"]
        self.text_ids = torch.tensor([self.tokenizer.bos_token_id, *text])
        mean, std = _pi0_action_stats(path, local)
        if mean is None:
            warnings.warn(f"no action_stats.json for {path}: PI0 actions are used un-normalised")
            mean, std = [0.0] * action_dim, [1.0] * action_dim
        self.act_mean = torch.tensor(mean[:action_dim], device=device)
        self.act_std = torch.tensor(std[:action_dim], device=device) + 1e-8  # PI0Processor's epsilon
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=gen).to(device)
        self._init_caches(num_envs)

    def _init_caches(self, num_envs):
        self.num_envs, self.num_model_calls = num_envs, 0
        self.chunks = torch.zeros(num_envs, self.model.config.chunk_size, self.action_dim, device=self.device)
        self.step_in_chunk = torch.full((num_envs,), self.chunk_steps, device=self.device)  # >= chunk_steps: query

    def reset(self, mask, seed=None):
        self.step_in_chunk[mask.to(self.device)] = self.chunk_steps

    @torch.no_grad()
    def __call__(self, obs):
        stale = self.step_in_chunk >= self.chunk_steps
        if stale.any():
            idx = stale.nonzero()[:, 0]
            self.chunks[idx] = self._sample(obs["state"][idx].to(self.device), obs["rgb"][idx].to(self.device))
            self.step_in_chunk[idx] = 0
            self.num_model_calls += 1
        action = self.chunks[torch.arange(self.num_envs, device=self.device), self.step_in_chunk.long()]
        self.step_in_chunk += 1
        return action

    def _sample(self, state, rgb):
        b, n_cams, h, w, _ = rgb.shape
        ids = torch.cat([self.image_tokens.repeat(n_cams), self.text_ids]).to(self.device).expand(b, -1)
        # Images: resize into the model's square keeping the aspect ratio, to [-1, 1], pad right/bottom with 0
        # (what PI0ImageProcessor does, without its torchvision dependency).
        x = rgb.reshape(b * n_cams, h, w, 3).permute(0, 3, 1, 2).float()
        s = self.image_size / max(h, w)
        size = (round(h * s), round(w * s))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True).round().clamp(0, 255)
        x = F.pad(x / 127.5 - 1.0, (0, self.image_size - size[1], 0, self.image_size - size[0]))
        dtype = self.model.dtype  # a checkpoint saved in bf16 loads (and must be fed) in bf16
        chunk = self.model.sample_actions(
            state=F.pad(state[:, QPOS], (0, self.max_state_dim - 9)).to(dtype),  # proprioception: the joint positions
            input_ids=ids,
            pixel_values=x.reshape(b, n_cams, 3, self.image_size, self.image_size).to(dtype),
            noise=self.noise.expand(b, -1, -1).to(dtype),
            attention_mask=torch.ones_like(ids),
            pixel_attention_mask=torch.ones(b, n_cams, dtype=torch.bool, device=self.device),
        )
        return (chunk[..., : self.action_dim].float() * self.act_std + self.act_mean).clamp(-1.0, 1.0)


def _pi0_action_stats(path: str, local: bool):
    """(mean, std) from action_stats.json, else processor_config.json's actions_mean/std; (None, None) if neither."""
    for name, keys in (("action_stats.json", ("mean", "std")), ("processor_config.json", ("actions_mean", "actions_std"))):
        file = os.path.join(path, name)
        if not local:
            try:
                from huggingface_hub import hf_hub_download

                file = hf_hub_download(path, name)
            except Exception:  # absent on the hub, or offline: try the next source
                continue
        if os.path.isfile(file):
            try:
                with open(file) as f:
                    stats = json.load(f)
                if all(k in stats for k in keys):
                    return stats[keys[0]], stats[keys[1]]
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigError(f"{file} is not valid JSON") from None
            if name == "action_stats.json":
                raise ConfigError(f"{file} must hold 'mean' and 'std' lists")
    return None, None


def _to_frame(R, p0, p):
    """World points p (B, 3) in the frames (R (B, 3, 3), p0 (B, 3))."""
    return ((p - p0).unsqueeze(1) @ R).squeeze(1)


def _clip_norm(x, m):
    return x * (m / x.norm(dim=-1, keepdim=True).clamp(min=m))


class ExpertBase(BasePolicy):
    """Privileged-state scripted controller in delta-EE space: the hand-designed base of classic residual RL.

    Phases are read off the state every step: reach above the peg's tail, descend, close, carry the peg head onto
    the hole axis, insert. Controller facts it relies on (pd_ee_delta_pose, measured here): the arm achieves only
    ~35-40 % of a commanded delta per step, so yaw is the slow part; the rotation action turns about the NEGATIVE
    world axis; the CPU back end's IK fails on large steps and beyond ~0.785 m reach (so steps are capped and far
    grasp points pulled in); the wrist camera sits 4-6 cm ahead of the TCP and would hit the box face if the peg
    were held at its tail's centre, hence the grasp at least 6.5 cm behind the peg centre (still on the tail).
    The only per-env memory is an integrator on the head's lateral error, cleared on reset.
    """

    @dataclass
    class Config:
        grasp_off: float = 0.065  # grasp >= this far behind the peg centre (camera clearance), and ...
        grasp_frac: float = 0.5  # ... >= this fraction of the half length L (0.5: the tail half's middle). A base
        # that takes the wrong part, e.g. coarse:grasp_frac=-0.3,grasp_off=-1 grasps 0.3 L ahead of the centre
        reach: float = 0.785  # max horizontal grasp-point distance from the robot base (CPU IK limit)
        hover: float = 0.05  # approach height above the grasp point while still turning
        standoff: float = 0.04  # the head waits this far in front of the box face until aligned
        tol_lat: float = 0.002  # lateral head error allowed at the face (the clearance is 3 mm)
        tol_ang: float = 0.02  # peg-to-hole axis angle allowed at the face (rad)
        funnel: float = 0.1  # extra lateral tolerance per metre in front of the face (x5 for the angle)
        v_entry: float = 0.008  # head lead along the hole axis per step within 2 cm of the face ...
        v_insert: float = 0.02  # ... and elsewhere
        x_goal: float = 0.0  # final head depth in the hole frame (success needs >= -0.015)
        kp: float = 1.5  # position gain (fraction of the error commanded per step)
        kr: float = 1.5  # rotation gain
        ki: float = 0.3  # lateral integral gain: the PD target sags 1-3 mm under the peg's weight
        max_pos: float = 0.4  # translation action-norm cap (keeps the CPU IK from failing)
        max_rot: float = 1.0  # rotation action-norm cap

    ROBOT_BASE = (-0.615, 0.0, 0.0)  # where PegInsertionSide-v1 places the Panda

    def __init__(self, num_envs, device, seed=0, **config):
        self.cfg, self.device = self.Config(**config), torch.device(device)
        self._init_caches(num_envs)

    def _init_caches(self, num_envs):
        self.num_envs = num_envs
        self.i_lat = torch.zeros(num_envs, 3, device=self.device)

    def reset(self, mask, seed=None):
        self.i_lat[mask.to(self.device)] = 0

    @torch.no_grad()
    def __call__(self, obs):
        state = obs["state"].to(self.device)
        pos_des, R_des, grip = self.target(state)
        R_tcp = quaternion_to_matrix(state[:, TCP_POSE][:, 3:])
        dpos = _clip_norm(self.cfg.kp * (pos_des - state[:, TCP_POSE][:, :3]) / 0.1, self.cfg.max_pos)
        e_rot = matrix_to_axis_angle(R_des @ R_tcp.transpose(1, 2))
        drot = _clip_norm(-self.cfg.kr * e_rot / 0.1, self.cfg.max_rot)  # the controller turns about -action
        return torch.cat([dpos, drot, grip], -1)

    def target(self, state, hole_p=None, R_hole=None):
        """Desired TCP position (B, 3), orientation (B, 3, 3) and gripper command (B, 1); the hole pose may be an
        estimate (the coarse base's), else the true one from the state."""
        P, dev = self.cfg, state.device
        tcp, peg, hole = state[:, TCP_POSE], state[:, PEG_POSE], state[:, HOLE_POSE]
        p_tcp, p_peg = tcp[:, :3], peg[:, :3]
        R_tcp, R_peg = quaternion_to_matrix(tcp[:, 3:]), quaternion_to_matrix(peg[:, 3:])
        hole_p = hole[:, :3] if hole_p is None else hole_p
        R_hole = quaternion_to_matrix(hole[:, 3:]) if R_hole is None else R_hole
        L, r = state[:, PEG_HALF_SIZE][:, 0:1], state[:, PEG_HALF_SIZE][:, 1:2]
        width = state[:, QPOS][:, 7:9].sum(-1, keepdim=True)
        u = R_peg[:, :, 0]
        down = torch.tensor([0.0, 0.0, -1.0], device=dev).expand_as(u)

        # grasp: top-down, TCP x along the peg axis, s behind the peg centre on the tail half; s is pulled towards
        # the centre (never past 0.3 L) when the tail end is out of reach: largest s with |p_peg - s u - base|_xy
        # <= reach
        s = torch.maximum(P.grasp_frac * L, torch.full_like(L, P.grasp_off))
        dxy, uxy = (p_peg - torch.tensor(self.ROBOT_BASE, device=dev))[:, :2], u[:, :2]
        du, uu = (dxy * uxy).sum(-1, keepdim=True), (uxy * uxy).sum(-1, keepdim=True)
        disc = (du**2 - uu * ((dxy * dxy).sum(-1, keepdim=True) - P.reach**2)).clamp(min=0)
        s = torch.minimum(s, ((du + disc.sqrt()) / uu).clamp(min=0.3 * L))
        grasp_pt = p_peg - u * s
        gx = F.normalize(u * torch.tensor([1.0, 1.0, 0.0], device=dev), dim=-1)
        gx = gx * torch.where((gx * R_tcp[:, :, 0]).sum(-1, keepdim=True) >= 0, 1.0, -1.0)  # least turning
        R_grasp = torch.stack([gx, torch.cross(down, gx, dim=-1), down], dim=-1)
        rot_err = matrix_to_axis_angle(R_grasp @ R_tcp.transpose(1, 2)).norm(dim=-1, keepdim=True)
        xy_err = (grasp_pt - p_tcp)[:, :2].norm(dim=-1, keepdim=True)
        # turning is slow: hover until lined up, then go straight down (looser once low: no chattering)
        low = ((p_tcp - grasp_pt)[:, 2:3] < 0.03).float()
        lined_up = (xy_err < 0.01 + 0.005 * low) & (rot_err < 0.15 + 0.1 * low)
        pos_grasp = grasp_pt - torch.where(lined_up, 0.0, P.hover) * down
        tcp_in_peg = _to_frame(R_peg, p_peg, p_tcp)
        between = (tcp_in_peg[:, 1:].norm(dim=-1, keepdim=True) < r + 0.01) & (tcp_in_peg[:, :1].abs() < L)
        holding = between & (width < 2 * r + 0.004) & (width > 2 * r - 0.01)
        close = (lined_up & ((grasp_pt - p_tcp).norm(dim=-1, keepdim=True) < 0.008)) | (between & (width < 0.075))

        # carry and insert: servo the peg head along the hole axis
        n = R_hole[:, :, 0]
        h = _to_frame(R_hole, hole_p, p_peg + u * L)  # head in the hole frame
        hx, lat = h[:, :1], h[:, 1:].norm(dim=-1, keepdim=True)
        ang = torch.arccos((u * n).sum(-1, keepdim=True).clamp(-1, 1))
        in_hole = (hx > -L + 0.005) & (lat < state[:, HOLE_RADIUS])
        # alignment funnel: tolerances shrink to (tol_lat, tol_ang) at the face, so the approach does not
        # stop and go when its own motion perturbs the alignment a little
        to_face = (-L - hx).clamp(min=0)
        aligned = (lat < P.tol_lat + P.funnel * to_face) & (ang < P.tol_ang + 5 * P.funnel * to_face)
        advance = in_hole | aligned
        # not aligned: wait at the standoff, or back off to 1 cm in front of the face if jammed on it
        x_wait = torch.where(hx > -L - P.standoff, torch.minimum(hx, -L - 0.01), -L - P.standoff)
        # crawl through the entry (fast motion shakes the head sideways by millimetres), then push on
        lead = torch.where(in_hole | (to_face > 0.02), P.v_insert, P.v_entry)
        hx_des = torch.where(advance, torch.minimum(hx + lead, torch.full_like(hx, P.x_goal)), x_wait)
        # the desired TCP keeps the current TCP-in-peg transform: slip and droop in the fingers are compensated
        R_carry = R_hole @ (R_peg.transpose(1, 2) @ R_tcp)
        pos_carry = hole_p + n * (hx_des - L) + (R_hole @ tcp_in_peg.unsqueeze(-1)).squeeze(-1)
        lift = (pos_carry - p_tcp)[:, 2:3] > 0.03  # lift off the table before travelling sideways
        pos_carry = torch.where(lift, torch.cat([p_tcp[:, :2] + 0.3 * (pos_carry - p_tcp)[:, :2],
                                                 pos_carry[:, 2:]], -1), pos_carry)
        near_box = holding & (hx > -L - P.standoff - 0.02)
        e_lat = -(R_hole[:, :, 1:] @ h[:, 1:].unsqueeze(-1)).squeeze(-1)  # world vector head -> hole axis
        self.i_lat = torch.where(near_box, (self.i_lat + e_lat).clamp(-0.01, 0.01), torch.zeros_like(self.i_lat))
        pos_carry = pos_carry + P.ki / P.kp * self.i_lat

        pos_des = torch.where(holding, pos_carry, pos_grasp)
        R_des = torch.where(holding.unsqueeze(-1), R_carry, R_grasp)
        return pos_des, R_des, torch.where(holding | close, -1.0, 1.0)


class CoarseBase(BasePolicy):
    """The expert made imprecise the way a VLA is, so a residual has real work to do.

    (i) A per-episode error in its estimate of the hole pose: N(0, hole_pos_std) along the hole frame's y and z
        (the clearance is 3 mm) and small pitch/yaw errors of the hole axis. The residual sees the true state.
    (ii) Low-rate open-loop chunks: every `chunk` steps the expert's target pose (for the estimated hole) is
        queried; the chunk covers the straight-line motion to it in `chunk` equal delta actions, each divided by
        `track_frac` (the arm achieves only that fraction of a delta per step) and capped; the gripper is held.
        Tracking errors are corrected only at the next query (5 Hz with chunk=4, like a VLA's action chunks).
    (iii) Gaussian noise N(0, action_noise) on the six arm dimensions of every step.
    All draws come from one seeded generator: deterministic given the seed.
    """

    @dataclass
    class Config:
        hole_pos_std: float = 0.004  # m
        hole_yaw_std: float = 0.01  # rad
        hole_pitch_std: float = 0.005  # rad
        chunk: int = 4  # steps per open-loop chunk
        action_noise: float = 0.02
        track_frac: float = 0.35  # fraction of a commanded delta the arm achieves per step
        grasp_off: float = 0.065  # where its expert grasps the peg (see ExpertBase.Config)
        grasp_frac: float = 0.5

    def __init__(self, num_envs, device, seed=0, **config):
        self.cfg, self.device = self.Config(**config), torch.device(device)
        self.cfg.chunk = int(self.cfg.chunk)
        if self.cfg.chunk < 1:
            raise ConfigError(f"--base coarse: chunk must be >= 1, got {self.cfg.chunk}")
        # the expert plans `chunk` steps ahead per query, so its per-step leads scale with the chunk
        lead = ExpertBase.Config()
        self.expert = ExpertBase(num_envs, device, v_insert=lead.v_insert * self.cfg.chunk,
                                 v_entry=lead.v_entry * self.cfg.chunk, grasp_off=self.cfg.grasp_off,
                                 grasp_frac=self.cfg.grasp_frac)
        self.gen = torch.Generator().manual_seed(seed)
        self._init_caches(num_envs)

    def _init_caches(self, num_envs):
        self.num_envs = num_envs
        self.expert = self.expert.resized(num_envs)
        self.gen = copy.deepcopy(self.gen)
        self.hole_dp = torch.zeros(num_envs, 3, device=self.device)  # hole position error in the hole frame
        self.hole_dR = torch.eye(3, device=self.device).repeat(num_envs, 1, 1)  # hole orientation error
        self.step = torch.zeros(num_envs, dtype=torch.long, device=self.device)  # steps into the chunk
        self.plan = torch.zeros(num_envs, 7, device=self.device)  # the action repeated within the chunk
        self.reset(torch.ones(num_envs, dtype=torch.bool))

    def reset(self, mask, seed=None):
        if seed is not None:
            self.gen.manual_seed(seed)
        mask = mask.to(self.device)
        k = int(mask.sum())
        if k == 0:  # the usual case after a step (no episode ended): skip ~40 tensor ops; draws nothing either way
            return
        self.expert.reset(mask)
        dp = torch.zeros(k, 3)
        dp[:, 1:] = torch.randn(k, 2, generator=self.gen) * self.cfg.hole_pos_std
        aa = torch.zeros(k, 3)
        aa[:, 1] = torch.randn(k, generator=self.gen) * self.cfg.hole_pitch_std
        aa[:, 2] = torch.randn(k, generator=self.gen) * self.cfg.hole_yaw_std
        self.hole_dp[mask], self.hole_dR[mask] = dp.to(self.device), axis_angle_to_matrix(aa).to(self.device)
        self.step[mask] = 0

    @torch.no_grad()
    def __call__(self, obs):
        state = obs["state"].to(self.device)
        query = (self.step % self.cfg.chunk == 0).unsqueeze(-1)
        if query.any():
            R_hole = quaternion_to_matrix(state[:, HOLE_POSE][:, 3:])
            hole_p = state[:, HOLE_POSE][:, :3] + (R_hole @ self.hole_dp.unsqueeze(-1)).squeeze(-1)
            i_old = self.expert.i_lat.clone()
            pos_des, R_des, grip = self.expert.target(state, hole_p, R_hole @ self.hole_dR)
            self.expert.i_lat = torch.where(query, self.expert.i_lat, i_old)  # only queried envs integrate
            per_step = self.cfg.chunk * self.cfg.track_frac * 0.1
            dpos = _clip_norm((pos_des - state[:, TCP_POSE][:, :3]) / per_step, self.expert.cfg.max_pos)
            e_rot = matrix_to_axis_angle(R_des @ quaternion_to_matrix(state[:, TCP_POSE][:, 3:]).transpose(1, 2))
            drot = _clip_norm(-e_rot / per_step, self.expert.cfg.max_rot)
            self.plan = torch.where(query, torch.cat([dpos, drot, grip], -1), self.plan)
        self.step += 1
        noise = torch.randn(self.num_envs, 6, generator=self.gen).to(self.device) * self.cfg.action_noise
        return torch.cat([(self.plan[:, :6] + noise).clamp(-1, 1), self.plan[:, 6:]], -1)


BASE_NAMES = ("pi0", "expert", "coarse", "zero")


def parse_base_spec(spec: str) -> tuple[str, str]:
    """`name[:arg]` -> (name, arg); checks the name, so a bad --base fails before any simulator starts."""
    name, _, arg = spec.partition(":")
    if name not in BASE_NAMES:
        raise ConfigError(f"unknown --base {spec!r}: choose pi0:<hub id or folder>, expert, coarse or zero")
    if name == "pi0" and not arg:
        raise ConfigError("--base pi0 needs a checkpoint: pi0:<hub id or local folder>")
    if name in ("expert", "coarse"):
        _scripted_base_options(name, arg)  # bad options fail here, before any simulator starts
    return name, arg


def _scripted_base_options(name: str, arg: str) -> dict:
    """`key=value,...` of --base expert|coarse -> the keyword arguments of its Config."""
    kwargs = {}
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise ConfigError(f"bad --base option {item!r}: expected key=number") from None
    known = {f.name for f in dataclasses.fields((ExpertBase if name == "expert" else CoarseBase).Config)}
    unknown = set(kwargs) - known
    if unknown:
        raise ConfigError(f"unknown --base {name} option(s) {sorted(unknown)}; known: {sorted(known)}")
    return kwargs


def base_needs_images(spec: str) -> bool:
    return parse_base_spec(spec)[0] == "pi0"


def make_base_policy(spec: str, envs: VecEnv, seed: int = 0) -> BasePolicy:
    """Build the frozen base named by `--base`: pi0:<hub id or folder>, expert, coarse[:key=value,...], or zero."""
    name, arg = parse_base_spec(spec)
    if name == "zero":
        return ZeroBase(envs.action_dim)
    if name == "pi0":
        if not envs.images:
            raise ConfigError("--base pi0 needs camera images: build the envs with images=True")
        return PI0Base(arg, envs.action_dim, envs.num_envs, envs.device, seed=seed)
    # expert or coarse
    if envs.control_mode != "pd_ee_delta_pose":
        raise ConfigError(
            f"--base {name} outputs 7-dim pd_ee_delta_pose actions; the env's control mode {envs.control_mode} "
            f"takes {envs.action_dim}-dim actions"
        )
    cls = ExpertBase if name == "expert" else CoarseBase
    return cls(envs.num_envs, envs.device, seed=seed, **_scripted_base_options(name, arg))


# ----------------------------------------------------------------------------------------------------------------------
# Residual composition (paper eq. 1): a = clip(a_base + scale * a_res), a_res in [-1, 1] from the policy's tanh
# ----------------------------------------------------------------------------------------------------------------------
def compose_action(a_base: torch.Tensor, a_res: torch.Tensor, scale: float) -> torch.Tensor:
    return (a_base + scale * a_res).clamp(-1.0, 1.0)


def residual_obs(state: torch.Tensor, a_base: torch.Tensor) -> torch.Tensor:
    """s_RL = [s_t, a_base] (paper section 2.1)."""
    return torch.cat([state, a_base], -1)


TASK_FEATURE_DIM = 7


def task_features(state: torch.Tensor) -> torch.Tensor:
    """(B, 7) features of the peg's head relative to the hole, computed from the poses already in the state.

    A residual that fixes a base's aim has to act on the head's lateral offset from the hole axis, a few millimetres
    hidden in a product of two quaternions: an MLP does not find that in a few hundred thousand samples, so we hand
    it over (RPL and Policy Decorator give their residuals such task frames too). A proportional controller on
    `e_lat` alone lifts the coarse base from 0.37 to 0.84 success (benchmarks/oracle_residual.py).
    - e_lat (3): world vector from the head to the hole axis, in cm, its norm clipped at 2 cm
    - depth (1): the head's position along the hole axis from the entrance, in cm, clipped to [-10, 5]
    - tilt (3): peg axis x hole axis (world), the sine of their angle along the turn that would align them
    """
    peg, hole = state[:, PEG_POSE], state[:, HOLE_POSE]
    R_peg, R_hole = quaternion_to_matrix(peg[:, 3:]), quaternion_to_matrix(hole[:, 3:])
    half_len = state[:, PEG_HALF_SIZE][:, :1]
    head = _to_frame(R_hole, hole[:, :3], peg[:, :3] + R_peg[:, :, 0] * half_len)  # head in the hole frame
    e_lat = -(R_hole[:, :, 1:] @ head[:, 1:].unsqueeze(-1)).squeeze(-1)
    depth = (head[:, :1] + half_len).clamp(-0.1, 0.05)
    tilt = torch.cross(R_peg[:, :, 0], R_hole[:, :, 0], dim=-1)
    return torch.cat([100 * _clip_norm(e_lat, 0.02), 100 * depth, tilt], -1)


def residual_state(state: torch.Tensor, with_task_features: bool) -> torch.Tensor:
    """The state part of the residual's observation: s_t, or [s_t, task_features(s_t)]."""
    return torch.cat([state, task_features(state)], -1) if with_task_features else state


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation on ManiSkill's protocol (eval envs from make_env(eval_mode=True))
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    envs: VecEnv,
    base: BasePolicy,
    num_episodes: int,
    residual: Optional[Callable[[dict, torch.Tensor], torch.Tensor]] = None,
    scale: float = 0.0,
    seed: int = 0,
    trace: Optional[list] = None,
) -> dict[str, float]:
    """Mean success_once, success_at_end, return and episode_len over `num_episodes` full-length episodes.

    `residual(obs, a_base) -> a_res` (deterministic, in [-1, 1]); None evaluates the base alone. A residual with
    per-episode memory gives the callable a `reset(mask)` attribute, called as the base's is. Envs and base are
    reset with `seed` first, so every call sees the same episodes and base-vs-residual comparisons are paired.
    `trace`, a list, receives (a_base, a_res, done) per step, on the CPU (for keep_successful_trajectories).
    `median_steps_to_success` is the median over the successful episodes of the step of their first success.
    """
    obs = envs.reset(seed=seed)
    base.reset(torch.ones(envs.num_envs, dtype=torch.bool, device=envs.device), seed=seed)
    residual_reset = getattr(residual, "reset", lambda mask: None)
    residual_reset(torch.ones(envs.num_envs, dtype=torch.bool, device=envs.device))
    stats: dict[str, list] = {}
    episodes = 0
    while episodes < num_episodes:
        a_base = base(obs)
        a_res = torch.zeros_like(a_base) if residual is None else residual(obs, a_base)
        obs, _, terminated, truncated, info = envs.step(compose_action(a_base, a_res, scale))
        done = terminated | truncated
        if trace is not None:
            trace.append((a_base.cpu(), a_res.cpu(), done.cpu()))
        if done.any():
            base.reset(done)
            residual_reset(done)
            episodes += int(done.sum())
            for k, v in info["episode"].items():
                stats.setdefault(k, []).append(v[done].float().cpu())
    out = {k: torch.cat(v)[:num_episodes].mean().item() for k, v in stats.items() if k != "success_step"}
    # how long success took: the median over the episodes that succeeded (NaN if none did)
    out["median_steps_to_success"] = torch.cat(stats["success_step"])[:num_episodes].nanmedian().item()
    out["episodes"] = num_episodes
    return out


def keep_successful_trajectories(record_dir: str, trace: list, num_envs: int, scale: float) -> int:
    """Merge the per-env recordings of an evaluate() call into <record_dir>/trajectories.{h5,json}, keeping only the
    episodes that end in success, each with its base and residual actions and the instruction: data to fine-tune the
    VLA on (the data flywheel of the paper's section 1). Returns how many episodes were kept.

    Env i's file holds env i's episodes in order (CPU back end); on the GPU back end one file holds all envs'
    episodes, written env by env at every full reset.
    """
    import h5py

    # Split the trace into episodes per env, in the order the recorder numbered them.
    a_base, a_res, done = (torch.stack(x) for x in zip(*trace))  # (T, B, 7), (T, B, 7), (T, B)
    episodes = {i: [] for i in range(num_envs)}
    for i in range(num_envs):
        ends = done[:, i].nonzero()[:, 0].tolist()
        for start, end in zip([0] + [e + 1 for e in ends], ends):
            episodes[i].append((a_base[start : end + 1, i], scale * a_res[start : end + 1, i]))
    files = sorted(f[:-3] for f in os.listdir(record_dir) if f.startswith("env") and f.endswith(".h5"))
    if len(files) == 1 and num_envs > 1:  # GPU: rounds of num_envs episodes, env by env
        order = [(0, i, r) for r in range(max(map(len, episodes.values()))) for i in range(num_envs)]
    else:
        order = [(k, int(f[3:]), r) for k, f in enumerate(files) for r in range(len(episodes[int(f[3:])]))]
    out_h5 = h5py.File(os.path.join(record_dir, "trajectories.h5"), "w")
    meta, kept, cursor = None, [], {}
    for k, name in enumerate(files):
        with open(os.path.join(record_dir, name + ".json")) as f:
            info = json.load(f)
        meta = meta or {key: v for key, v in info.items() if key != "episodes"}
        cursor[k] = (h5py.File(os.path.join(record_dir, name + ".h5"), "r"), info["episodes"])
    positions = {k: 0 for k in cursor}
    for k, env_i, r in order:
        src, eps = cursor[k]
        if positions[k] >= len(eps) or r >= len(episodes[env_i]):
            continue
        ep = eps[positions[k]]
        positions[k] += 1
        if not ep.get("success", False):
            continue
        new_id = len(kept)
        src.copy(f"traj_{ep['episode_id']}", out_h5, name=f"traj_{new_id}")
        base_actions, residual_actions = episodes[env_i][r]
        out_h5[f"traj_{new_id}"].create_dataset("base_actions", data=base_actions.numpy())
        out_h5[f"traj_{new_id}"].create_dataset("residual_actions", data=residual_actions.numpy())
        kept.append(dict(ep, episode_id=new_id, instruction=INSTRUCTION))
    out_h5.close()
    for k, name in enumerate(files):
        cursor[k][0].close()
        os.remove(os.path.join(record_dir, name + ".h5")), os.remove(os.path.join(record_dir, name + ".json"))
    with open(os.path.join(record_dir, "trajectories.json"), "w") as f:
        json.dump(dict(meta or {}, instruction=INSTRUCTION, episodes=kept), f, indent=2)
    return len(kept)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints, seeding, logging, running mean/std
# ----------------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Atomic: write a temporary file, then rename, so a crash or Ctrl-C never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, script: str, base: Optional[str] = None) -> dict:
    """Load a checkpoint written by `script`; clear errors for a missing, corrupt, foreign or mismatched file."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise ConfigError(f"{path} is not a checkpoint of this repository")
    if ckpt["script"] != script:
        raise ConfigError(f"{path} was written by {ckpt['script']}, not {script}")
    if base is not None and ckpt.get("base") != base:
        raise ConfigError(f"{path} was trained on base {ckpt.get('base')!r}, not {base!r}: pass --base {ckpt.get('base')}")
    return ckpt


def seed_everything(seed: int, torch_deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def rng_state() -> dict:
    """Every RNG a script draws from, for exact resume."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Logger:
    """Tensorboard under runs/<run_name>/ plus the run's arguments as text."""

    def __init__(self, run_name: str, args) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = os.path.join("runs", run_name)
        self.writer = SummaryWriter(self.dir)
        rows = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        self.writer.close()


class RunningMeanStd:
    """Running mean/variance over a batch axis (Chan et al.'s parallel update), with its count for exact resume."""

    def __init__(self, shape, device="cpu", epsilon: float = 1e-4):
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.var = torch.ones(shape, dtype=torch.float64, device=device)
        self.count = torch.tensor(epsilon, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, *self.mean.shape).double()
        batch_mean, batch_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
        return ((x - self.mean.float()) / torch.sqrt(self.var.float() + 1e-8)).clamp(-clip, clip)

    def state_dict(self) -> dict:
        return dict(mean=self.mean, var=self.var, count=self.count)

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = (state[k].to(self.mean.device) for k in ("mean", "var", "count"))
