"""affordance_ppo.py: camera projection against rendered segmentation, the tail map, the reward of paper eq. 2, the
map carried with the peg, the CLIPSeg provider on a tiny model, and end to end as a subprocess with a tiny budget."""

import json

import pytest
import torch
from conftest import Script, assert_same_tensors, run, scalars

import affordance_ppo as ap
import common

TINY = ["--num-envs", "1", "--num-eval-envs", "1", "--num-eval-episodes", "1", "--num-steps", "50",
        "--num-minibatches", "2", "--update-epochs", "2", "--hidden-dim", "32", "--max-episode-steps", "50"]
AFF = Script("affordance_ppo.py", TINY)
GRIPPER = {"panda_hand", "panda_hand_tcp", "panda_leftfinger", "panda_rightfinger"}


@pytest.fixture(scope="module")
def aff_sim():
    """One in-process physx_cpu env inside the AffordanceWrapper, with the affordance camera at 128 px."""
    env = common._make_maniskill(
        env_id=common.ENV_ID, num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pose", images=False,
        camera_size=64, reward="staged", reward_cfg=common.StagedRewardConfig(), reconf=1,
        env_kwargs=dict(human_render_camera_configs={ap.AFF_CAMERA: dict(width=128, height=128)}))
    env = ap.AffordanceWrapper(env, "tail", "", coef=0.1, sigma=3.0)
    yield env
    env.close()


def peg_frame(u):
    R = common.quaternion_to_matrix(u.peg.pose.q)
    return R, u.peg.pose.p, u.peg_half_sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_puts_the_tcp_on_the_gripper_and_inverts_depth(aff_sim, seed):
    aff_sim.reset(seed=seed)
    u = aff_sim.unwrapped
    for _ in range(15):  # close the empty gripper: the fingertips meet at the TCP
        aff_sim.step(torch.tensor([[0.0] * 6 + [-1.0]]))
    view, params = aff_sim.render_view()
    names = {int(k): v.name for k, v in u.segmentation_id_map.items()}
    col, row = ap.project(u.agent.tcp.pose.p[:, None], params["extrinsic_cv"], params["intrinsic_cv"])[0, 0].long()
    around = {names.get(int(i)) for i in view.seg[0, row - 1 : row + 2, col - 1 : col + 2].flatten()}
    assert around & GRIPPER, around  # the TCP projects onto the gripper's own pixels
    # unproject(depth) puts every peg pixel on the peg's box (depth is stored in whole millimetres)...
    R, p, half = peg_frame(u)
    on_peg = view.seg[0] == view.peg_id[0]
    local = (view.xyz[0][on_peg] - p) @ R[0]
    assert on_peg.sum() > 50 and (local.abs() <= half + 0.003).all()
    # ...and project() takes those points back to their own pixel centres
    rows, cols = on_peg.nonzero(as_tuple=True)
    uv = ap.project(view.xyz[0][on_peg][None], params["extrinsic_cv"], params["intrinsic_cv"])[0]
    torch.testing.assert_close(uv, torch.stack([cols, rows], -1).float() + 0.5, atol=0.05, rtol=0)


def test_tail_map_is_the_tail_half_of_the_peg(aff_sim):
    aff_sim.reset(seed=4)
    view, _ = aff_sim.render_view()
    m = ap.TailAffordance()(view)
    assert m.shape == view.seg.shape and set(m.unique().tolist()) <= {0.0, 1.0}
    R, p, _ = peg_frame(aff_sim.unwrapped)
    on_peg = view.seg == view.peg_id[:, None, None]
    x = ((view.xyz - p[:, None, None]) * R[:, None, None, :, 0]).sum(-1)
    assert m.sum() > 20 and (m.bool() == (on_peg & (x < 0))).all()
    assert (x[on_peg & (x >= 0)]).numel() > 20  # the head half is visible and left out


def test_reward_is_maximal_over_the_mask():
    H = W = 40
    rows, cols = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pixels = torch.stack([cols, rows], -1).reshape(1, -1, 2)
    mask = torch.zeros(H, W)
    mask[10:19, 22:31] = 1.0  # a 9 x 9 block centred on pixel (26.5, 14.5)
    grid = pixels[0]  # p_ee at every pixel centre
    r = ap.affordance_reward(grid, pixels.expand(len(grid), -1, -1), mask.reshape(1, -1).expand(len(grid), -1), 2.0)
    best = grid[r.argmax()]
    assert best.tolist() == [26.5, 14.5] and (r >= 0).all() and (r <= 1).all()
    assert r.max() > 0.9  # erf(4.5 / (2 sqrt 2))^2 = 0.95 of the footprint lies on the block
    far = ap.affordance_reward(torch.tensor([[2.5, 35.5]]), pixels, mask.reshape(1, -1), 2.0)
    assert far < 1e-6


def test_the_map_follows_the_peg_without_a_new_frame(aff_sim):
    """Rendered at reset, carried with the peg's pose: after the peg moves, the carried map's pixels sit where a
    fresh render puts the tail."""
    from mani_skill.utils.structs.pose import Pose

    aff_sim.reset(seed=4)
    u = aff_sim.unwrapped
    before = ap.project(aff_sim.map_points(), aff_sim.extrinsic, aff_sim.intrinsic)[0]
    moved = u.peg.pose.raw_pose.clone()
    moved[:, 0] += 0.05  # 5 cm along the table
    u.peg.set_pose(Pose.create(moved))
    carried = ap.project(aff_sim.map_points(), aff_sim.extrinsic, aff_sim.intrinsic)[0]
    view, _ = aff_sim.render_view()
    rows, cols = ap.TailAffordance()(view)[0].nonzero(as_tuple=True)
    fresh_centre = torch.stack([cols, rows], -1).float().mean(0) + 0.5
    w = aff_sim.weights[0]
    centre = lambda uv: (uv * w[:, None]).sum(0) / w.sum()  # noqa: E731
    assert (centre(carried) - centre(before)).norm() > 3  # it moved by several pixels...
    assert (centre(carried) - fresh_centre).norm() < 1.0  # ...to where the tail now is


def test_clipseg_provider_on_a_tiny_model(tmp_path):
    from tiny_clipseg import build_tiny_clipseg

    folder = build_tiny_clipseg(str(tmp_path))
    provider = ap.make_provider(f"clipseg:{folder}", "the tail of the peg")
    for B, H, W in [(2, 24, 40), (1, 16, 16)]:  # CLIPSeg drops a batch of one: the provider must not
        view = ap.View(torch.randint(0, 256, (B, H, W, 3), dtype=torch.uint8), torch.zeros(B, H, W, dtype=torch.long),
                       torch.zeros(B, H, W, 3), torch.zeros(B, dtype=torch.long), torch.zeros(B, 7))
        m = provider(view)
        assert m.shape == (B, H, W) and torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 and m.std() > 0


def test_bad_affordance_specs(tmp_path):
    for spec, message in [("hand", "unknown --affordance"), ("tail:x", "unknown --affordance"),
                          (f"clipseg:{tmp_path}/none", "cannot load a model config")]:
        with pytest.raises(common.ConfigError, match=message):
            ap.parse_affordance(spec)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(common.ConfigError, match="not clipseg"):
        ap.parse_affordance(f"clipseg:{tmp_path}/bert")


def test_no_provider_renders_nothing_pays_nothing_and_still_measures_grasps(aff_sim):
    env = ap.AffordanceWrapper(aff_sim.env, "none", "", coef=0.1, sigma=3.0)
    env.reset(seed=0)
    assert env.weights.sum() == 0  # no map
    _, _, _, _, info = env.step(torch.zeros(1, 7))
    assert info["reward/affordance"].tolist() == [0.0]
    assert info["grasp/grasped"].tolist() == [0.0]  # not holding anything at the start


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of 100 steps in one run, and of 50 steps resumed to 100 (same seed), tail affordance."""
    tmp_path = tmp_path_factory.mktemp("aff")
    return AFF.resume_pair(tmp_path, ["--base", "coarse", "--eval-freq", "50", "--seed", "3"], 100, 50)


def test_training_logs_the_affordance_and_the_grasps(runs):
    (run_dir, ckpt), _ = runs
    assert ckpt["script"] == "affordance_ppo.py" and ckpt["global_step"] == 100
    tags = scalars(run_dir)
    for key in ("reward/affordance", "reward/grasp", "eval/grasp_rate", "eval/grasp_tail_frac",
                "eval_base/grasp_tail_frac", "eval/grasp_tail_dist", "charts/SPS"):
        assert key in tags, key
    assert all(0 < v <= 0.1 for _, v in tags["reward/affordance"])  # coef 0.1 times a fraction in (0, 1]
    # the coarse base grasps the tail (in its 50-step episodes, on this seed), near the tail's centre
    assert tags["eval_base/grasp_rate"][0][1] == 1.0 and tags["eval_base/grasp_tail_frac"][0][1] == 1.0
    assert 0 <= tags["eval_base/grasp_tail_dist"][0][1] < 0.05


def test_resume_is_exact(runs):
    (_, a), (_, b) = runs
    for part in ("agent", "obs_rms", "return_rms"):
        assert_same_tensors(a[part], b[part], part)


def test_evaluate_checkpoint_prints_json_with_grasps(runs):
    (run_dir, _), _ = runs
    out = run("affordance_ppo.py", "--base", "coarse", "--evaluate", "--checkpoint", run_dir / "ckpt.pt",
              "--num-eval-envs", "1", "--num-eval-episodes", "1", "--max-episode-steps", "50")
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["eval/episodes"] == 1 and stats["eval/grasp_rate"] in (0.0, 1.0)
    assert stats["eval/episode_len"] == 50


def test_clipseg_provider_end_to_end(tmp_path):
    """A learned provider loads in the simulator processes and pays; the grasps of the episodes that end during
    training are measured."""
    from tiny_clipseg import build_tiny_clipseg

    folder = build_tiny_clipseg(str(tmp_path / "clipseg_model"))
    out = AFF.train(tmp_path, "--base", "coarse", "--affordance", f"clipseg:{folder}", "--total-timesteps", 150,
                    "--eval-freq", "1000", "--exp-name", "clip")
    assert out.returncode == 0, out.stderr[-3000:]
    tags = scalars(AFF.checkpoint(tmp_path, "clip")[0])
    assert len(tags["reward/affordance"]) == 3 and all(0 < v <= 0.1 for _, v in tags["reward/affordance"])
    # three 50-step episodes ended (the first at step 50: logged with the rollout of steps 1-50): the coarse base
    # took the peg by its tail in each
    assert tags["train/grasp_rate"] == [(50, 1.0), (100, 1.0), (150, 1.0)]
    assert tags["train/grasp_tail_frac"] == [(50, 1.0), (100, 1.0), (150, 1.0)]
