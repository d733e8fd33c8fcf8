"""Environment factory: CPU vector env parity with single envs, ManiSkill's eval protocol, bad inputs."""

import signal
import time

import gymnasium as gym
import pytest
import torch

import common


def test_cpu_vector_env_matches_single_envs():
    """Env i of a 2-worker CPU vector env reproduces an in-process env seeded with seed + i, across an auto-reset,
    whether stepped with step() or step_async() + step_wait()."""
    seed, steps = 7, 110  # 110 > 100 steps: crosses the truncation and the same-step reset
    gen = torch.Generator().manual_seed(0)
    actions = torch.rand(steps, 2, 7, generator=gen) * 2 - 1
    # gymnasium builds one env in this process for its spaces: Ctrl-C must stay ours, only the workers ignore it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (pytest-xdist's workers ignore it)
    try:
        envs = common.make_env(2, "physx_cpu", seed=seed)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        obs = envs.reset()
        vec = [(obs["state"].clone(), None, None)]
        t0 = time.perf_counter()
        for t in range(steps):
            if t % 2:  # step() is step_async() + step_wait(): the learner may work in between
                envs.step_async(actions[t])
                obs, reward, terminated, truncated, info = envs.step_wait()
            else:
                obs, reward, terminated, truncated, info = envs.step(actions[t])
            vec.append((info["final_obs"]["state"].clone(), reward.clone(), obs["state"].clone()))
        # the simulator's own time (the slowest worker's env.step per step) is a part of the wall time
        assert 0 < envs.sim_time < time.perf_counter() - t0
    finally:
        envs.close()
    for i in range(2):
        single = common._make_maniskill(
            env_id=common.ENV_ID, num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pose",
            images=False, camera_size=64, reward="staged", reward_cfg=common.StagedRewardConfig(), reconf=10,
        )
        obs, _ = single.reset(seed=seed + i)
        torch.testing.assert_close(obs["state"][0], vec[0][0][i])
        for t in range(steps):
            obs, reward, terminated, truncated, _ = single.step(actions[t, i][None])
            torch.testing.assert_close(obs["state"][0], vec[t + 1][0][i])  # the true next observation
            torch.testing.assert_close(reward[0], vec[t + 1][1][i])
            if terminated.item() or truncated.item():
                obs, _ = single.reset()
                torch.testing.assert_close(obs["state"][0], vec[t + 1][2][i])  # the auto-reset observation
        single.close()


class SlowReset(gym.Wrapper):
    """A simulator whose reset takes at least a second (module level: it is pickled into the worker)."""

    def __init__(self, env):
        super().__init__(env)
        self.single_observation_space, self.single_action_space = env.single_observation_space, env.single_action_space

    def reset(self, **kwargs):
        time.sleep(1.0)
        return self.env.reset(**kwargs)


def test_sim_time_counts_the_workers_auto_reset():
    """The env's own time per step includes the same-step auto-reset of an env whose episode ended (the env's work,
    not the learner's): the step at the time limit pays the (1 s) reset, no step before it does, nor does the first
    reset (not a step). Per-step increments, not a speed: a loaded machine slows every step alike."""
    envs = common.make_env(1, "physx_cpu", seed=3, wrapper=SlowReset)
    try:
        envs.reset()
        increments = []
        for _ in range(envs.max_episode_steps - 1):
            before = envs.sim_time
            envs.step(torch.zeros(1, 7))
            increments.append(envs.sim_time - before)
        before, t0 = envs.sim_time, time.perf_counter()
        _, _, _, truncated, _ = envs.step(torch.zeros(1, 7))  # the time limit: the worker resets
        assert bool(truncated[0]) and max(increments) < 0.5, max(increments)
        assert 1.0 <= envs.sim_time - before < time.perf_counter() - t0
    finally:
        envs.close()


def test_eval_env_runs_full_episodes_and_reports_metrics():
    envs = common.make_env(2, "physx_cpu", eval_mode=True, seed=1)
    try:
        envs.reset()
        for t in range(envs.max_episode_steps):
            _, reward, terminated, truncated, info = envs.step(torch.zeros(2, 7))
            assert not terminated.any()  # ManiSkill's protocol: no early termination in eval
        assert truncated.all()
        ep = info["episode"]
        assert ep["episode_len"].tolist() == [100, 100]
        assert not ep["success_once"].any() and not ep["success_at_end"].any()  # standing still never inserts
        assert (ep["return"] < 0).all()  # every pre-success step of the staged reward is negative
    finally:
        envs.close()


def test_success_step_and_median_steps_to_success():
    """The step of an episode's first success, by hand and through evaluate() (same seed, same episode), and NaN
    where an episode never succeeds."""
    envs = common.make_env(1, "physx_cpu", eval_mode=True, seed=5)
    try:
        expert = common.ExpertBase(1, "cpu")
        obs = envs.reset(seed=5)
        first = None
        for t in range(1, envs.max_episode_steps + 1):
            obs, _, _, truncated, info = envs.step(expert(obs))
            if first is None and bool(info["success"][0]):
                first = t
        assert first is not None and first < envs.max_episode_steps and bool(truncated[0])
        assert info["episode"]["success_step"][0].item() == first
        stats = common.evaluate(envs, common.ExpertBase(1, "cpu"), 1, seed=5)
        assert stats["success_once"] == 1.0 and stats["median_steps_to_success"] == first
        stats = common.evaluate(envs, common.ZeroBase(7), 1, seed=5)
        assert stats["success_once"] == 0.0 and stats["median_steps_to_success"] != stats["median_steps_to_success"]
    finally:
        envs.close()


def test_train_env_ends_at_success_unless_told_to_ignore_terminations():
    """Train envs end an episode at success; with ignore_terminations=True (demo_explore_sac.py's
    --continue-after-success) the same episode runs on to the time limit, as an eval episode does."""
    ends = {}
    for ignore in (None, True):
        envs = common.make_env(1, "physx_cpu", seed=5, ignore_terminations=ignore)
        try:
            expert = common.ExpertBase(1, "cpu")
            obs = envs.reset(seed=5)
            for t in range(1, envs.max_episode_steps + 1):
                obs, _, terminated, truncated, info = envs.step(expert(obs))
                if terminated.any() or truncated.any():
                    break
            ends[ignore] = (t, bool(terminated[0]), info["episode"]["success_step"][0].item())
        finally:
            envs.close()
    (t0, term0, first0), (t1, term1, first1) = ends[None], ends[True]
    assert term0 and t0 == first0 < 100  # ended on its first success
    assert not term1 and t1 == 100 and first1 == first0  # the same success, then on to the time limit


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_envs=0), "--num-envs must be >= 1"),
        (dict(num_envs=512, sim_backend="physx_cpu"), "use --num-envs"),
        (dict(num_envs=1, sim_backend="tpu"), "unknown --sim-backend"),
        (dict(num_envs=1, reward="dense"), "unknown --reward"),
    ],
)
def test_bad_env_arguments(kwargs, message):
    with pytest.raises(common.ConfigError, match=message):
        common.make_env(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_backend_without_cuda_is_a_clear_error():
    with pytest.raises(common.ConfigError, match="needs CUDA"):
        common.make_env(4, "physx_cuda")
    assert common.resolve_sim_backend("auto") == "physx_cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_vector_env_steps():
    envs = common.make_env(16, "physx_cuda", seed=0)
    obs = envs.reset()
    for _ in range(3):
        obs, reward, terminated, truncated, info = envs.step(torch.zeros(16, 7, device=envs.device))
    assert obs["state"].shape == (16, common.STATE_DIM) and obs["state"].is_cuda
    assert set(info) >= {"final_obs", "episode", "success", "reward/grasp"}
    envs.close()


@pytest.fixture(scope="module")
def hidden():
    env = common._make_maniskill(
        env_id=common.HIDDEN_ENV_ID, num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pose",
        images=False, camera_size=64, reward="staged", reward_cfg=common.StagedRewardConfig(), reconf=1)
    yield env
    env.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hidden_variant_gives_only_an_estimate_of_the_hole(hidden, seed):
    obs, _ = hidden.reset(seed=seed)
    u, state = hidden.unwrapped, obs["state"]
    assert state.shape == (1, common.STATE_DIM + 3) and gym.spec(common.HIDDEN_ENV_ID).max_episode_steps == 200
    R = common.quaternion_to_matrix(u.box_hole_pose.q)[0]
    offset = (state[0, common.HOLE_POSE][:3] - u.box_hole_pose.p[0]) @ R  # in the hole frame
    assert abs(offset[0]) < 1e-6 and 0.01 - 1e-6 <= offset[1:].norm() <= 0.02 + 1e-6  # 1-2 cm off, in the face
    assert torch.equal(state[0, common.HOLE_POSE][3:], u.box_hole_pose.q[0])
    # the reward (and success) use the true hole; the policy's state does not hold it
    truth = u.privileged_state(state)
    assert torch.equal(truth[:, common.HOLE_POSE], u.box_hole_pose.raw_pose)
    assert not torch.equal(truth[:, common.HOLE_POSE], state[:, common.HOLE_POSE])
    assert (state[:, common.CONTACT_FORCE] == 0).all()  # nothing touches the box yet


def test_hidden_variant_camera_sees_the_panel_not_the_hole(hidden):
    hidden.reset(seed=3)
    u = hidden.unwrapped
    cam = u.scene.sensors["base_camera"]
    u.scene.update_render(update_sensors=True, update_human_render_cameras=False)
    cam.capture()
    seg = cam.get_obs(rgb=False, depth=False, position=False, segmentation=True)["segmentation"][0, ..., 0]
    p = cam.get_params()
    L = u.peg_half_sizes[0, 0]
    R = common.quaternion_to_matrix(u.box_hole_pose.q)[0]
    entrance = u.box_hole_pose.p[0] - L * R[:, 0]  # the hole's mouth on the box face
    uv = p["intrinsic_cv"][0] @ (p["extrinsic_cv"][0, :, :3] @ entrance + p["extrinsic_cv"][0, :, 3])
    col, row = int(uv[0] / uv[2]), int(uv[1] / uv[2])
    assert 0 <= row < seg.shape[0] and 0 <= col < seg.shape[1]
    assert int(seg[row, col]) == int(u.panel.per_scene_id[0])


def test_hidden_variant_reports_peg_box_contact(hidden):
    from mani_skill.utils.structs.pose import Pose

    hidden.reset(seed=0)
    u = hidden.unwrapped
    # drop the peg onto the top of the box: it rests there, pressing on the box
    top = u.box.pose.p.clone()
    top[:, 2] += u.peg_half_sizes[:, 0] + u.peg_half_sizes[:, 1] + 0.002
    u.peg.set_pose(Pose.create_from_pq(top, u.peg.pose.q))
    forces = []
    for _ in range(10):
        obs, *_ = hidden.step(torch.zeros(1, 7))
        forces.append(obs["state"][0, common.CONTACT_FORCE].norm())
    assert max(forces) > 0.1, forces
