"""demo_explore_sac.py: the scripted search, demonstration files (write, read, replay, bad files), the search
features and the BC target (end to end, exact resume included: test_demo_explore_training.py)."""

import json
import math
import shutil

import h5py
import pytest
import torch
from conftest import Script, run_batch, scalars
from test_cli import assert_one_line_error

import common
from demo_explore_sac import (SEARCH_FEATURE_DIM, SearchClock, generate_demos, read_demo_file, replay_demos,
                              search_features)

HIDDEN = common.HIDDEN_ENV_ID
TINY = ["--num-envs", "1", "--num-eval-envs", "1", "--num-eval-episodes", "1", "--batch-size", "32",
        "--hidden-dim", "32", "--learning-starts", "100", "--critic-warmup-updates", "5", "--log-freq", "50",
        "--bc-pretrain-updates", "20", "--buffer-size", "10000"]
DEMO = Script("demo_explore_sac.py", TINY)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Two scripted demonstrations in ManiSkill's format (2 CPU envs)."""
    path = tmp_path_factory.mktemp("demos") / "spiral.h5"
    stats = generate_demos(str(path), 2, HIDDEN, 2, seed=1000)
    return path, stats


def test_scripted_search_writes_successful_maniskill_trajectories(demos):
    path, stats = demos
    assert stats["kept"] == stats["successes"] >= 2
    meta = json.loads(path.with_suffix(".json").read_text())
    # train envs end an episode at success, so its first success is its last step
    lengths = torch.tensor([float(ep["elapsed_steps"]) for ep in meta["episodes"]])
    assert stats["median_steps_to_success"] == lengths.median().item() < 200
    assert meta["env_info"]["env_id"] == HIDDEN and meta["source_type"] == "scripted"
    assert all(ep["success"] and ep["control_mode"] == "pd_ee_delta_pose" for ep in meta["episodes"])
    with h5py.File(path) as f:
        for ep in meta["episodes"]:
            traj = f[f"traj_{ep['episode_id']}"]
            T = traj["actions"].shape[0]
            assert traj["actions"].shape == (T, 7) and T == ep["elapsed_steps"] < 200
            assert traj["obs"].shape == (T + 1, 46) and bool(traj["success"][-1])
            assert "base_actions" not in traj  # a demonstration is not split into base + residual


def test_replay_recomputes_base_actions_rewards_and_ends(demos):
    path, _ = demos
    meta, actions, labels = read_demo_file(str(path), 2, HIDDEN, 7)
    assert all(torch.equal(a, b) for a, b in zip(actions, labels))  # clean demonstrations: the labels are the actions
    d = replay_demos(meta, actions, labels, HIDDEN, "expert", "staged", seed=0)
    assert d["lengths"].tolist() == [len(a) for a in actions]
    ends = d["lengths"].cumsum(0) - 1
    assert d["terminated"][ends].all() and d["done"].sum() == 2  # each ends in success, and only there
    assert torch.equal(d["action"], torch.cat(actions))
    with h5py.File(path) as f:  # the replay retraces the recorded states (CPU physics is deterministic)
        rec = torch.as_tensor(f[f"traj_{meta['episodes'][0]['episode_id']}"]["obs"][()])
    assert torch.allclose(d["obs"][: len(actions[0]), :46], rec[:-1].float(), atol=1e-4)
    # the base's actions are the frozen base's on the replayed states
    expert = common.ExpertBase(1, "cpu")
    assert torch.allclose(d["a_base"][0], expert({"state": d["obs"][:1, :46]})[0])
    # the clock's columns: 0 until the peg touches the face, then one more per step, and the next state's ahead
    k = d["obs"][: len(actions[0]), 46] * 100
    start = int((k > 0).nonzero()[0])
    assert start > 10 and torch.allclose(k[start:], torch.arange(1, len(k) - start + 1).float())
    assert torch.allclose(d["next_obs"][: len(actions[0]) - 1], d["obs"][1 : len(actions[0])])
    assert d["reward"].max() <= 1.0 and d["reward"][ends].min() == 1.0  # the staged reward pays success
    # --reward-lateral: the replay pays the lateral aim term too (only while inserting, never on success)
    cfg = common.StagedRewardConfig(d3=10.0)
    lat = replay_demos(meta, actions, labels, HIDDEN, "expert", "staged", seed=0, reward_cfg=cfg)
    assert torch.equal(lat["obs"], d["obs"]) and (lat["reward"] <= d["reward"]).all()
    assert (lat["reward"] < d["reward"]).any() and torch.equal(lat["reward"][ends], d["reward"][ends])


def test_continuing_replay_bootstraps_at_the_insertion(demos):
    """--continue-after-success: success ends no episode, so the demonstrations' last transitions are not terminal
    (the critic bootstraps through them) but still close their episodes for the n-step returns."""
    path, _ = demos
    meta, actions, labels = read_demo_file(str(path), 2, HIDDEN, 7)
    d = replay_demos(meta, actions, labels, HIDDEN, "expert", "staged", seed=0, continuing=True)
    assert d["lengths"].tolist() == [len(a) for a in actions]  # kept: each file episode ends inserted
    ends = d["lengths"].cumsum(0) - 1
    assert d["terminated"].sum() == 0 and d["done"][ends].all() and d["done"].sum() == 2
    assert d["reward"][ends].min() == 1.0
    ref = replay_demos(meta, actions, labels, HIDDEN, "expert", "staged", seed=0)
    assert torch.equal(d["obs"], ref["obs"]) and torch.equal(d["reward"], ref["reward"])


def test_search_features_read_the_head_offset_from_the_estimate_and_the_force():
    state = torch.zeros(1, 46)
    L = 0.1
    state[0, common.PEG_HALF_SIZE] = torch.tensor([L, 0.02, 0.02])
    state[0, common.HOLE_POSE] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # estimate at 0, axis +x
    state[0, common.PEG_POSE] = torch.tensor([-2 * L + 0.01, 0.005, -0.003, 1.0, 0.0, 0.0, 0.0])  # head 1 cm in
    state[0, common.CONTACT_FORCE] = torch.tensor([3.0, 4.0, 0.0])
    f = search_features(state)
    assert f.shape == (1, SEARCH_FEATURE_DIM)
    assert torch.allclose(f[0], torch.tensor([0.5, -0.3, 1.0, math.log1p(5.0)]), atol=1e-4)


def test_search_clock_counts_from_first_contact_and_peek_does_not_count(demos):
    path, _ = demos
    with h5py.File(path) as f:
        states = torch.as_tensor(f["traj_0/obs"][()]).float()
    clock = SearchClock(1, "cpu")
    rows = []
    for s in states:
        assert torch.equal(clock.peek(s[None]), clock.peek(s[None]))  # peeking changes nothing
        rows.append(clock.observe(s[None])[0])
    rows = torch.stack(rows)
    assert rows.shape == (len(states), 46 + SearchClock.DIM) and torch.equal(rows[:, :46], states)
    k = rows[:, 46] * 100
    assert k[0] == 0 and k[-1] > 0 and (k.diff() > -1e-4).all() and (k.diff() < 1 + 1e-4).all()
    assert (rows[:, 47:].norm(dim=-1) <= 2.5 + 1e-4).all()  # the pattern point stays within max_radius (cm)
    assert rows[-1, 47:].norm() > 0.5  # and has moved out by the time the peg went in
    clock.reset(torch.ones(1, dtype=torch.bool))
    assert clock.observe(states[:1])[0, 46] == 0
    assert SearchClock(1, "cpu", enabled=False).observe(states[:1]).shape == (1, 46)


def test_bad_demonstration_files(demos, tmp_path):
    path, _ = demos
    with pytest.raises(common.ConfigError, match="not found"):
        read_demo_file(str(tmp_path / "none.h5"), 1, HIDDEN, 7)
    with pytest.raises(common.ConfigError, match="holds 2 episodes, --num-demos asks for 5"):
        read_demo_file(str(path), 5, HIDDEN, 7)
    with pytest.raises(common.ConfigError, match=f"holds {HIDDEN} episodes, not PegInsertionSide-v1"):
        read_demo_file(str(path), 1, "PegInsertionSide-v1", 7)
    with pytest.raises(common.ConfigError, match="expected \\(T, 8\\)"):
        read_demo_file(str(path), 1, HIDDEN, 8)  # an action size that does not fit the env
    (tmp_path / "bad.json").write_text(path.with_suffix(".json").read_text())
    (tmp_path / "bad.h5").write_bytes(b"not an h5 file")
    with pytest.raises(common.ConfigError, match="corrupt"):
        read_demo_file(str(tmp_path / "bad.h5"), 1, HIDDEN, 7)
    (tmp_path / "bad.json").write_text("{\"episodes\": [")
    with pytest.raises(common.ConfigError, match="not a ManiSkill trajectory json"):
        read_demo_file(str(tmp_path / "bad.h5"), 1, HIDDEN, 7)
    shutil.copy(path.with_suffix(".json"), tmp_path / "six.json")  # a file whose actions have 6 dimensions
    with h5py.File(path) as f, h5py.File(tmp_path / "six.h5", "w") as g:
        for traj in f:
            for key in f[traj]:
                if key in ("actions", "expert_actions"):
                    g[f"{traj}/{key}"] = f[f"{traj}/{key}"][()][:, :6]
    # and on the command line: one line, exit code 2, before any simulator starts (one subprocess for them all),
    # except the action size, which the env tells
    cases = {"demonstration file not found": ["--demos", tmp_path / "none.h5"],
             "--demo-ratio must be in [0, 1)": ["--demo-ratio", "1"],
             "--demo-noise must be in [0, 1]": ["--demo-noise", "-0.1"],
             "--eval-ema must be in [0, 1)": ["--eval-ema", "1"],
             "its actions have 6 dimensions, the env's 7": ["--demos", tmp_path / "six.h5", "--num-demos", "1"]}
    for message, outcome in zip(cases, run_batch([("demo_explore_sac.py", c) for c in cases.values()])):
        assert_one_line_error(outcome, message)
        assert outcome.processes_started == 0 or message.startswith("its actions")


def test_dart_demonstrations_store_clean_labels_and_replay(tmp_path):
    """--demo-noise: the executed arm actions carry noise, the file keeps them (so it replays to success) and the
    demonstrator's clean actions as expert_actions, which read_demo_file returns as the labels."""
    path = tmp_path / "dart.h5"
    stats = generate_demos(str(path), 1, HIDDEN, 1, seed=1000, noise=0.05)
    assert stats["kept"] == 1 and "DART noise 0.05" in json.loads(path.with_suffix(".json").read_text())["source_desc"]
    meta, actions, labels = read_demo_file(str(path), 1, HIDDEN, 7)
    noise = actions[0] - labels[0]
    assert noise[:, 6].abs().max() == 0  # the gripper is not perturbed
    free = labels[0][:, :6].abs() < 0.9  # away from the action bounds the noise is unclipped
    assert 0.03 < noise[:, :6][free].std() < 0.07
    d = replay_demos(meta, actions, labels, HIDDEN, "expert", "staged", seed=0)
    assert d["terminated"][-1] and torch.equal(d["action"], actions[0]) and torch.equal(d["label"], labels[0])
    with h5py.File(path, "r+") as f:  # a label array that does not fit its actions: one-line error
        traj = f[f"traj_{meta['episodes'][0]['episode_id']}"]
        del traj["expert_actions"]
        traj["expert_actions"] = labels[0][:-1].numpy()
    with pytest.raises(common.ConfigError, match="expert_actions has shape"):
        read_demo_file(str(path), 1, HIDDEN, 7)


def test_bc_target_is_the_label_not_the_executed_action(demos, tmp_path):
    """The script clones expert_actions where a file has them, in the BC pretraining and in the BC term during RL: a
    copy whose labels push every arm dimension to +1 saturates far more of the BC targets than the original, whose
    labels are its actions, and its BC loss during RL is larger (same seed, same executed actions)."""
    path, _ = demos
    copy = tmp_path / "relabelled.h5"
    copy.write_bytes(path.read_bytes())
    copy.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    with h5py.File(copy, "r+") as f:
        for name in f:
            label = f[name]["actions"][()]
            label[:, :6] = 1.0
            f[name]["expert_actions"] = label
    saturated, bc_loss = [], []
    for file, name in ((path, "orig"), (copy, "relabelled")):
        out = DEMO.train(tmp_path, "--demos", file, "--num-demos", "1", "--total-timesteps", "150",
                         "--bc-pretrain-updates", "1", "--eval-freq", "1000", "--exp-name", name,
                         "--max-episode-steps", "20")  # short evaluations: only the BC targets and loss matter here
        assert out.returncode == 0, out.stderr[-3000:]
        run_dir, ckpt = DEMO.checkpoint(tmp_path, name)
        saturated.append(ckpt["demos"]["demos/residual_saturated"])
        bc_loss.append(scalars(run_dir)["losses/bc_loss"][-1][1])
    assert saturated[1] > saturated[0] + 0.2, saturated
    assert bc_loss[1] > 2 * bc_loss[0], bc_loss
