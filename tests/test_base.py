"""Frozen base policies: PI0 loaded from a saved tiny checkpoint, the scripted expert and coarse bases, zero."""

import json
import math
import shutil
import types
import warnings

import pytest
import torch

import common


def fake_envs(num_envs=3, action_dim=7, images=True, control_mode="pd_ee_delta_pose"):
    """What make_base_policy reads from a VecEnv, without starting a simulator."""
    return types.SimpleNamespace(num_envs=num_envs, action_dim=action_dim, device=torch.device("cpu"), images=images,
                                 control_mode=control_mode)


def fake_obs(num_envs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(num_envs, common.STATE_DIM, generator=gen),
            "rgb": torch.randint(0, 256, (num_envs, 2, 64, 64, 3), generator=gen, dtype=torch.uint8)}


def load_pi0(folder, num_envs=3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no action_stats.json: identity, with a warning checked below
        return common.make_base_policy(f"pi0:{folder}", fake_envs(num_envs))


def test_pi0_from_saved_folder_is_frozen_and_shaped(tiny_pi0):
    base = load_pi0(tiny_pi0)
    action = base(fake_obs(3))
    assert action.shape == (3, 7) and torch.isfinite(action).all() and action.abs().max() <= 1
    assert not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())
    # Deterministic: a second load gives the same actions on the same observations.
    torch.testing.assert_close(load_pi0(tiny_pi0)(fake_obs(3)), action)


@pytest.mark.parametrize("steps", [1, 8, 20])
def test_pi0_chunk_cache_queries_every_k_steps(tiny_pi0, steps):
    base = load_pi0(tiny_pi0, num_envs=1)
    obs = fake_obs(1)
    chunk = [base(obs) for _ in range(steps)]
    assert base.num_model_calls == math.ceil(steps / base.chunk_steps)  # k = chunk size 8
    # Within one chunk the actions are the chunk's successive entries, not one action repeated.
    if steps >= 2:
        assert not torch.equal(chunk[0], chunk[1])


def test_pi0_reset_requeries_only_the_reset_envs(tiny_pi0):
    base = load_pi0(tiny_pi0, num_envs=3)
    obs = fake_obs(3)
    first = base(obs)
    base(obs)
    base.reset(torch.tensor([False, True, False]))
    calls = base.num_model_calls
    third = base(fake_obs(3, seed=1))
    assert base.num_model_calls == calls + 1
    # Envs 0 and 2 kept their cached chunk (step 3 of it); env 1 got a fresh chunk from the new observation.
    fresh = load_pi0(tiny_pi0, num_envs=1)({k: v[1:2] for k, v in fake_obs(3, seed=1).items()})
    torch.testing.assert_close(third[1], fresh[0])
    assert not torch.equal(third[0], first[0])


def test_pi0_saved_in_bfloat16_runs_in_bfloat16(tiny_pi0, tmp_path):
    """Released VLA checkpoints are often bf16: they load as saved, and the base must feed them bf16 inputs."""
    from transformers import PI0ForConditionalGeneration

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_pi0, folder)
    PI0ForConditionalGeneration.from_pretrained(tiny_pi0).to(torch.bfloat16).save_pretrained(folder)
    base = load_pi0(folder)
    assert base.model.dtype == torch.bfloat16
    action = base(fake_obs(3))
    assert action.dtype == torch.float32 and action.shape == (3, 7) and torch.isfinite(action).all()
    # the same network in float32, up to bf16's precision
    torch.testing.assert_close(action, load_pi0(tiny_pi0)(fake_obs(3)), atol=0.1, rtol=0)


def test_pi0_action_stats_unnormalise(tiny_pi0, tmp_path):
    folder = tmp_path / "with_stats"
    shutil.copytree(tiny_pi0, folder)
    raw = load_pi0(tiny_pi0)(fake_obs(3))
    mean, std = [0.1] * 7, [0.5] * 7
    (folder / "action_stats.json").write_text(json.dumps({"mean": mean, "std": std}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stats present: no warning
        scaled = common.make_base_policy(f"pi0:{folder}", fake_envs())(fake_obs(3))
    # Un-normalised before clipping to the action bounds, so compare where the raw chunk was inside them.
    inside = raw.abs() < 0.99
    torch.testing.assert_close(scaled[inside], (raw * 0.5 + 0.1).clamp(-1, 1)[inside], atol=1e-5, rtol=1e-5)


def test_pi0_warns_without_action_stats(tiny_pi0):
    with pytest.warns(UserWarning, match="no action_stats.json"):
        common.make_base_policy(f"pi0:{tiny_pi0}", fake_envs())


@pytest.mark.parametrize(
    "spec, envs, message",
    [
        ("pi0:/no/such/folder", fake_envs(), "checkpoint folder not found"),
        ("pi0:", fake_envs(), "needs a checkpoint"),
        ("gr00t", fake_envs(), "unknown --base"),
        ("expert", fake_envs(action_dim=8, control_mode="pd_joint_delta_pos"), "outputs 7-dim pd_ee_delta_pose"),
        ("coarse:hole_pos_std=abc", fake_envs(), "expected key=number"),
        ("coarse:nonsense=1", fake_envs(), "unknown --base coarse option"),
    ],
)
def test_bad_base_specs(spec, envs, message):
    with pytest.raises(common.ConfigError, match=message):
        common.make_base_policy(spec, envs)


def test_pi0_action_size_that_does_not_fit_the_env(tiny_pi0):
    with pytest.raises(common.ConfigError, match="outputs 8-dim actions; the env needs 9"):
        common.make_base_policy(f"pi0:{tiny_pi0}", fake_envs(action_dim=9))


def test_corrupt_pi0_folder_is_a_clear_error(tiny_pi0, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_pi0, folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(common.ConfigError, match="could not load PI0"):
        load_pi0(folder)


def test_zero_base():
    base = common.make_base_policy("zero", fake_envs(images=False))
    assert torch.equal(base(fake_obs(3)), torch.zeros(3, 7))


def test_expert_episode_succeeds_and_walks_through_the_reward_stages():
    """One real episode of the scripted expert: it inserts the peg, and the staged reward moves grasp -> (orient) ->
    insert -> success along the way (the contact indicator comes from the simulator's finger-peg forces)."""
    envs = common.make_env(1, "physx_cpu", seed=0)
    try:
        obs = envs.reset()
        base = common.make_base_policy("expert", envs)
        stages = []
        for _ in range(envs.max_episode_steps):
            obs, reward, terminated, truncated, info = envs.step(base(obs))
            stages.append(info["reward/stage"].item())
            if terminated.any() or truncated.any():
                break
    finally:
        envs.close()
    assert terminated.item() and info["episode"]["success_at_end"].item()  # train envs end on success
    assert info["reward/success"].item() == common.StagedRewardConfig().r_success
    c1, c2, c3 = common.StagedRewardConfig().stage_offsets
    assert stages[0] == pytest.approx(c1) and c3 in [pytest.approx(s) for s in stages]
    first_insert = next(i for i, s in enumerate(stages) if s == pytest.approx(c3))
    assert all(s != pytest.approx(c1) for s in stages[first_insert:-1])  # never dropped the peg once aligned


def test_coarse_is_seeded_and_resets_per_env():
    envs = fake_envs(num_envs=4, images=False)
    obs = fake_obs(4)
    obs["state"][:, common.TCP_POSE.start + 3] = 1.0  # valid quaternions are all the policy needs
    runs = []
    for seed in (0, 0, 1):
        base = common.make_base_policy("coarse", envs, seed=seed)
        runs.append(torch.stack([base(obs) for _ in range(6)]))
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    base = common.make_base_policy("coarse:chunk=2,hole_pos_std=0.01", envs, seed=0)
    assert base.cfg.chunk == 2 and base.cfg.hole_pos_std == 0.01
    before = base.hole_dp.clone()
    base.reset(torch.tensor([False, True, False, False]))
    assert torch.equal(before[[0, 2, 3]], base.hole_dp[[0, 2, 3]]) and not torch.equal(before[1], base.hole_dp[1])
    # A hole error is drawn in the hole frame's y-z plane only (the face the peg must hit).
    assert (base.hole_dp[:, 0] == 0).all() and (base.hole_dp[:, 1:] != 0).all()


def test_grasp_point_options_move_the_grasp_along_the_peg(sim):
    """Default: the tail (>= L/2 behind the centre); coarse:grasp_frac=-0.3,grasp_off=-1: 0.3 L ahead, on the head."""
    obs, _ = sim.reset(seed=0)
    state = obs["state"]
    R_peg = common.quaternion_to_matrix(state[:, common.PEG_POSE][:, 3:])
    L = state[:, common.PEG_HALF_SIZE][:, 0]
    envs = fake_envs(num_envs=1, images=False)
    for spec, along in [("coarse", -max(0.5 * L.item(), 0.065)),
                        ("coarse:grasp_frac=-0.3,grasp_off=-1", 0.3 * L.item())]:
        base = common.make_base_policy(spec, envs)
        pos, _, _ = base.expert.target(state)  # hovering above the grasp point (the peg lies flat)
        x = ((pos - state[:, common.PEG_POSE][:, :3]) * R_peg[:, :, 0]).sum(-1).item()
        assert x == pytest.approx(along, abs=1e-5), spec


def test_coarse_chunks_hold_the_plan_between_queries():
    envs = fake_envs(num_envs=1, images=False)
    obs = fake_obs(1)
    obs["state"][:, common.TCP_POSE.start + 3] = 1.0
    base = common.make_base_policy("coarse:action_noise=0,chunk=4", envs)
    actions = torch.stack([base(obs) for _ in range(7)])
    assert torch.equal(actions[0], actions[3]) and torch.equal(actions[4], actions[6])
    moved = {"state": obs["state"].clone()}
    moved["state"][:, common.PEG_POSE.start] += 0.05
    assert torch.equal(base(moved), actions[6])  # the world changed, but the rest of the chunk is open-loop...
    base.reset(torch.tensor([True]))
    assert not torch.equal(base(moved), actions[6])  # ...until the next query (here: right after a reset)


def test_eval_bases_share_models_with_fresh_caches(tiny_pi0):
    base = load_pi0(tiny_pi0, num_envs=3)
    small = base.resized(1)
    assert small.model is base.model and small.chunks.shape[0] == 1 and small.num_model_calls == 0
    small({k: v[:1] for k, v in fake_obs(3).items()})
    assert base.num_model_calls == 0


def test_pi0_base_drives_a_real_env_with_images(tiny_pi0):
    """The tiny PI0 through a real CPU env with two tiny cameras: images in, chunked actions out."""
    envs = common.make_env(1, "physx_cpu", images=True, camera_size=32, seed=0)
    try:
        obs = envs.reset()
        assert obs["rgb"].shape == (1, 2, 32, 32, 3) and obs["rgb"].dtype == torch.uint8
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = common.make_base_policy(f"pi0:{tiny_pi0}", envs)
        for _ in range(10):
            obs, *_ = envs.step(base(obs))
        assert base.num_model_calls == math.ceil(10 / base.chunk_steps)
    finally:
        envs.close()


def test_vla_cost_benchmark_times_a_saved_pi0(tmp_path):
    """benchmarks/vla_cost.py (run on a GPU at full size) on a tiny PI0 on the CPU: one row per batch, sane times."""
    from conftest import run

    out = tmp_path / "vla_cost.json"
    proc = run("benchmarks/vla_cost.py", "--size", "tiny", "--batch-sizes", "1", "3", "--repeats", "2", "--device",
               "cpu", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = json.loads(out.read_text())
    assert d["loaded_dtype"] == "torch.bfloat16" and d["parameters"] > 0
    rows = d["results"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["chunk_steps"] == 8 and r["query_ms"] > r["step_ms"] > 0  # the tiny model's chunk of 8
        per_step = (r["query_ms"] + 7 * r["step_ms"]) / 8
        assert math.isclose(r["per_vector_step_ms"], per_step) and math.isclose(
            r["base_env_steps_per_s"], r["batch"] / per_step * 1e3)
    assert (tmp_path / "vla_cost.png").stat().st_size > 0
    bad = run("benchmarks/vla_cost.py", "--size", "huge", "--out", out)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --size must be 'full' or 'tiny', got 'huge'"
