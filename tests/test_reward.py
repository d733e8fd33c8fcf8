"""The staged reward (paper section 2.3): each term against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from mani_skill.utils.structs import Pose

import common

CFG = common.StagedRewardConfig()


def yaw_quat(theta):
    return [math.cos(theta / 2), 0.0, 0.0, math.sin(theta / 2)]


def terms(tcp, peg, half, hole, radius, width, contact, success, cfg=CFG):
    """Terms for one env whose state vector holds these poses ([x, y, z, qw, qx, qy, qz]), sizes and finger width."""
    state = torch.zeros(1, common.STATE_DIM)
    state[0, common.QPOS][7:9] = width / 2
    for part, value in ((common.TCP_POSE, tcp), (common.PEG_POSE, peg), (common.PEG_HALF_SIZE, half),
                        (common.HOLE_POSE, hole), (common.HOLE_RADIUS, [radius])):
        state[0, part] = torch.tensor(value, dtype=torch.float32)
    out = common.staged_reward_terms(state, torch.tensor([contact]), torch.tensor([success]), cfg)
    return {k: v.item() for k, v in out.items()}


L, R = 0.1, 0.02  # peg half length and half width


def test_grasp_stage_terms():
    # TCP straight above the tail point, gripper x along world x, peg yawed by 0.3 rad, fingers fully open (8 cm).
    theta = 0.3
    v_peg = np.array([math.cos(theta), math.sin(theta), 0.0])
    peg_p = np.array([0.05, -0.1, R])
    tail = peg_p - 0.5 * L * v_peg
    tcp_p = tail + np.array([0.0, 0.0, 0.12])
    out = terms([*tcp_p, 1, 0, 0, 0], [*peg_p, *yaw_quat(theta)], [L, R, R], [0, 0.3, 0.1, 1, 0, 0, 0], 0.023,
                0.08, False, False)
    expected = -CFG.a1 * 0.12 - CFG.a2 * theta - CFG.b3 * abs(0.08 - 2 * R)
    assert out["grasp"] == pytest.approx(expected, abs=1e-6)
    assert out["orient"] == out["insert"] == out["success"] == 0
    assert out["stage"] == pytest.approx(CFG.stage_offsets[0])


def test_grasp_angle_is_symmetric_and_contact_pays_b1():
    peg = [0.0, 0.0, R, *yaw_quat(0.0)]
    tail_tcp = [-0.5 * L, 0, R]
    turned = terms([*tail_tcp, *yaw_quat(math.pi)], peg, [L, R, R], [0, 0.3, 0.1, 1, 0, 0, 0], 0.023, 2 * R, False,
                   False)
    assert turned["grasp"] == pytest.approx(0.0, abs=1e-6)  # half-turned gripper: same grasp
    # Contact switches the stage: the held peg (aligned with this hole) is scored by R_insert, not R_grasp.
    held = terms([*tail_tcp, 1, 0, 0, 0], peg, [L, R, R], [0, 0.3, 0.1, 1, 0, 0, 0], 0.023, 2 * R, True, False)
    assert held["grasp"] == 0 and held["insert"] != 0


def test_orient_stage_terms():
    phi = 0.7  # hole normal yawed 0.7 rad from the peg axis
    out = terms([-0.05, 0, R, 1, 0, 0, 0], [0, 0, R, 1, 0, 0, 0], [L, R, R], [0, 0.3, 0.1, *yaw_quat(phi)], 0.023,
                2 * R, True, False)
    assert out["orient"] == pytest.approx(-CFG.g1 * phi, abs=1e-6)
    assert out["grasp"] == out["insert"] == 0
    assert out["stage"] == pytest.approx(CFG.stage_offsets[1])


@pytest.mark.parametrize("depth, lateral, d3", [(0.03, 0.0, 0.0), (0.03, 0.03, 0.0), (0.0, 0.0, 0.0),
                                                (0.0, 0.004, 10.0), (0.03, 0.03, 10.0)])
def test_insert_stage_terms(depth, lateral, d3):
    # Peg and hole both along world x; the hole centre sits (L - depth) ahead of the head and `lateral` to the side,
    # so the head is `depth` past the box face (the box spans x in [-L, L] around the hole centre), and
    # hypot(depth, lateral) from the hole's entrance, the p_hole of R_insert. d3 (0: the paper's formula) charges the
    # lateral offset itself, clipped at lateral_clip (0.02 < 0.03).
    cfg = common.StagedRewardConfig(d3=d3)
    head = np.array([L, 0.0, R])
    hole = head + np.array([L - depth, lateral, 0.0])
    out = terms([-0.05, 0, R, 1, 0, 0, 0], [0, 0, R, 1, 0, 0, 0], [L, R, R], [*hole, 1, 0, 0, 0], R + 0.003, 2 * R,
                True, False, cfg)
    in_bore = lateral <= R + 0.003
    expected = (-CFG.d1 * math.hypot(depth, lateral) + CFG.d2 * depth * in_bore
                - d3 * min(lateral, cfg.lateral_clip))
    assert out["insert"] == pytest.approx(expected, abs=1e-6)
    assert out["stage"] == pytest.approx(CFG.stage_offsets[2])


def test_success_pays_only_r_success():
    out = terms([-0.05, 0, R, 1, 0, 0, 0], [0, 0, R, 1, 0, 0, 0], [L, R, R], [L, 0, R, 1, 0, 0, 0], R + 0.003, 2 * R,
                True, True)
    assert out == {"grasp": 0, "orient": 0, "insert": 0, "success": CFG.r_success, "stage": 0}


def test_stages_are_monotone_with_default_offsets():
    """Each stage pays more than the best of the one before it (why stage_offsets exist), and all pay < 0."""
    c1, c2, c3 = CFG.stage_offsets
    best_grasp, worst_orient = c1 + CFG.b1, c2 - CFG.g1 * math.pi
    worst_insert = c3 - CFG.d1 * 0.6  # a held, aligned peg's head is well within 0.6 m of the hole
    assert best_grasp < worst_orient < c2 < worst_insert
    lateral = common.StagedRewardConfig(d3=10.0)  # --reward-lateral 10: within 0.4 m, insert still beats orient
    assert c2 < c3 - lateral.d1 * 0.4 - lateral.d3 * lateral.lateral_clip
    deepest = 0.125 - 0.015  # deeper than this is a success (head past the box's middle)
    assert c3 + (CFG.d2 - CFG.d1) * deepest < 0 < CFG.r_success


def test_reward_read_from_the_simulator(sim):
    """Poses set in the simulator give the hand-computed R_grasp; the env's reward is the sum of the terms."""
    env = sim.unwrapped
    theta = 0.4
    env.peg.set_pose(Pose.create_from_pq(torch.tensor([[0.02, -0.1, 0.03]]), torch.tensor([yaw_quat(theta)])))
    info = env.evaluate()
    out = {k: v.item() for k, v in common.staged_reward(env, env.get_obs(info), info, CFG).items()}
    tcp = env.agent.tcp.pose
    tcp_p = tcp.p[0].numpy()
    tcp_x = tcp.to_transformation_matrix()[0, :3, 0].numpy()
    half = env.peg_half_sizes[0].numpy()
    v_peg = np.array([math.cos(theta), math.sin(theta), 0.0])
    tail = np.array([0.02, -0.1, 0.03]) - 0.5 * half[0] * v_peg
    width = env.agent.robot.get_qpos()[0, -2:].sum().item()
    expected = (
        -CFG.a1 * np.linalg.norm(tcp_p - tail)
        - CFG.a2 * math.acos(min(1.0, abs(float(tcp_x @ v_peg))))
        - CFG.b3 * abs(width - 2 * half[1])
    )
    assert out["grasp"] == pytest.approx(expected, abs=1e-5)
    _, reward, *_ , step_info = sim.step(torch.zeros(1, 7))
    assert reward.item() == pytest.approx(sum(step_info[f"reward/{k}"].item() for k in common.REWARD_TERMS))


def test_success_in_the_simulator(sim):
    """The peg placed at the goal pose (head at the hole centre) is a success: R = R_success alone."""
    env = sim.unwrapped
    env.peg.set_pose(env.goal_pose)
    info = env.evaluate()
    assert info["success"].item()
    out = {k: v.item() for k, v in common.staged_reward(env, env.get_obs(info), info, CFG).items()}
    assert out == {"grasp": 0, "orient": 0, "insert": 0, "success": CFG.r_success, "stage": 0}


@pytest.mark.parametrize("theta", [0.0, 0.7])
def test_task_features_give_the_heads_offset_from_the_hole_axis(theta):
    """Head 3 mm left of and 1 mm below the hole axis, 2 cm before the entrance, peg 0.05 rad off the axis in yaw;
    the whole scene turned by theta about world z: e_lat and tilt turn with it, depth does not."""
    c, s = math.cos(theta), math.sin(theta)
    Rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    hole_p = np.array([0.1, 0.3, 0.1])
    head_in_hole = np.array([-L - 0.02, 0.003, -0.001])  # hole frame = world frame turned by theta
    tilt = 0.05
    v_peg_local = np.array([math.cos(tilt), math.sin(tilt), 0.0])
    peg_p = hole_p + Rz @ (head_in_hole - L * v_peg_local)
    state = torch.zeros(1, common.STATE_DIM)
    state[0, common.PEG_POSE] = torch.tensor([*peg_p, *yaw_quat(theta + tilt)], dtype=torch.float32)
    state[0, common.PEG_HALF_SIZE] = torch.tensor([L, R, R])
    state[0, common.HOLE_POSE] = torch.tensor([*hole_p, *yaw_quat(theta)], dtype=torch.float32)
    f = common.task_features(state)[0].double().numpy()
    assert f.shape == (common.TASK_FEATURE_DIM,)
    np.testing.assert_allclose(f[:3], Rz @ np.array([0.0, -0.3, 0.1]), atol=1e-4)  # cm, head -> axis
    np.testing.assert_allclose(f[3], -2.0, atol=1e-4)  # cm before the entrance
    np.testing.assert_allclose(f[4:], [0.0, 0.0, -math.sin(tilt)], atol=1e-5)  # peg x hole axis: turn back by tilt
    far = state.clone()
    far[0, common.PEG_POSE.start + 1] += 0.5  # half a metre off: the lateral part saturates at 2 cm
    assert abs(np.linalg.norm(common.task_features(far)[0, :3].numpy()) - 2.0) < 1e-4
    with_f = common.residual_state(state, True)
    assert with_f.shape == (1, common.STATE_DIM + common.TASK_FEATURE_DIM) and torch.equal(with_f[:, :43], state)
    assert torch.equal(common.residual_state(state, False), state)
