"""sac_residual.py end to end, as a subprocess with a tiny budget: train, evaluate, resume exactly, bad inputs."""

import importlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, Script, assert_same_tensors, interrupt_after, run, scalars
from test_cli import assert_one_line_error

import common

TINY = ["--num-envs", "1", "--num-eval-envs", "1", "--num-eval-episodes", "1", "--batch-size", "32",
        "--hidden-dim", "32", "--learning-starts", "100", "--critic-warmup-updates", "5", "--log-freq", "50",
        "--progressive-steps", "50", "--buffer-size", "10000"]


SAC = Script("sac_residual.py", TINY)


@pytest.mark.parametrize("script", ["sac_residual", "mbrl_residual", "demo_explore_sac"])
@pytest.mark.parametrize("n_step", [1, 3])
def test_n_step_returns_match_a_plain_loop(n_step, script):
    """Two envs, 6 steps, a buffer of 4 steps (so it wraps), env 0's episode ending at step 1 and both envs reset
    mid-episode after step 3 (an evaluation: `end_episodes`, a truncation): every sampled transition's return,
    discount and bootstrap row against a per-env walk through the steps (the real buffers of the three scripts)."""
    ReplayBuffer = importlib.import_module(script).ReplayBuffer

    E, T, gamma = 2, 6, 0.9
    rb = ReplayBuffer(8, 1, 1, E, "cpu")
    reward = torch.arange(T * E, dtype=torch.float32).reshape(T, E) + 1
    terminated = torch.zeros(T, E, dtype=torch.bool)
    terminated[1, 0] = True
    done = terminated.clone()
    done[3] = True  # the restart after step 3
    for t in range(T):
        rb.add(obs=torch.tensor([[t], [t]]), a_base=torch.zeros(E, 1), action=torch.zeros(E, 1), reward=reward[t],
               next_obs=torch.tensor([[t + 1], [t + 101]]), next_a_base=torch.zeros(E, 1),
               terminated=terminated[t], done=terminated[t], phase=torch.zeros(E))
        if t == 3:
            rb.end_episodes()
    torch.manual_seed(0)
    b = rb.sample(500, n_step, gamma)
    for i in range(500):
        t, env = int(b["obs"][i]), int(b["next_obs"][i]) // 100  # rows hold steps 2..5 (0, 1 were overwritten)
        ret, k = 0.0, 0
        while k < n_step and t + k < T:
            ret += gamma**k * reward[t + k, env].item()
            k += 1
            if done[t + k - 1, env]:
                break
        assert b["reward"][i].item() == pytest.approx(ret)
        assert b["discount"][i].item() == pytest.approx(gamma**k)
        assert int(b["next_obs"][i]) == t + k + 100 * env  # bootstrap from the last step summed
        assert bool(b["terminated"][i]) == bool(terminated[t + k - 1, env])
    assert {int(t) for t in b["obs"]} == {2, 3, 4, 5}
    resumed = ReplayBuffer(8, 1, 1, E, "cpu")
    resumed.load_state_dict(rb.state_dict())
    torch.manual_seed(0)
    again = resumed.sample(500, n_step, gamma)
    assert all(torch.equal(b[k], again[k]) for k in b)  # a restored (full, wrapped) buffer samples the very same


@pytest.mark.parametrize("script", ["sac_residual", "mbrl_residual", "demo_explore_sac"])
def test_checkpointed_buffer_holds_only_its_rows(script):
    """A buffer's state_dict holds the rows written so far, in storage of their own: a slice of the preallocated
    buffer would take its whole storage into torch.save (the default 1M rows: ~500 MB per checkpoint at any step)."""
    ReplayBuffer = importlib.import_module(script).ReplayBuffer
    rb = ReplayBuffer(10_000, 50, 7, 2, "cpu")
    for _ in range(3):
        rb.add(obs=torch.ones(2, 50), a_base=torch.zeros(2, 7), action=torch.zeros(2, 7), reward=torch.ones(2),
               next_obs=torch.ones(2, 50), next_a_base=torch.zeros(2, 7), terminated=torch.zeros(2),
               done=torch.zeros(2), phase=torch.zeros(2))
    state = rb.state_dict()
    assert {len(v) for v in state["data"].values()} == {6}
    for v in state["data"].values():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
    saved = io.BytesIO()
    torch.save(state, saved)
    assert len(saved.getvalue()) < 20_000  # 6 rows of ~125 floats, not 10,000
    resumed = ReplayBuffer(10_000, 50, 7, 2, "cpu")
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
    assert all(torch.equal(resumed.data[k], rb.data[k]) for k in rb.data) and resumed.ptr == rb.ptr == 6


def test_held_residual_transitions_start_at_decisions():
    """--residual-hold 3: two envs whose episodes end at different steps, a buffer of 8 steps that has kept steps
    4-11 of 12: each row maps to the decision whose residual it executed (its phase steps back), or, where that
    decision was overwritten, to the env's next decision, against a walk through the steps; sampled 3-step
    transitions then all start at a decision and sum that decision's 3 rewards."""
    ReplayBuffer = importlib.import_module("sac_residual").ReplayBuffer
    E, T, hold, gamma = 2, 12, 3, 0.9
    rb = ReplayBuffer(16, 1, 1, E, "cpu")
    ends = [{4, 9}, {6}]  # the last step of each env's episodes
    phase, t_ep = torch.zeros(T, E, dtype=torch.long), [0] * E
    for t in range(T):
        done = torch.tensor([t in ends[e] for e in range(E)])
        phase[t] = torch.tensor([t_ep[e] % hold for e in range(E)])
        t_ep = [0 if done[e] else t_ep[e] + 1 for e in range(E)]
        rb.add(obs=torch.tensor([[t], [t]]), a_base=torch.zeros(E, 1), action=torch.zeros(E, 1),
               reward=torch.tensor([t + 1.0, 100.0 * (t + 1)]), next_obs=torch.tensor([[t + 1], [t + 1]]),
               next_a_base=torch.zeros(E, 1), terminated=done, done=done, phase=phase[t])
    kept = range(T - 8, T)

    def decision(t, e):  # walk back to the window's start; forward to the next decision if it is gone
        start = t - int(phase[t, e])
        return start if start in kept else next(u for u in range(t + 1, T) if phase[u, e] == 0)

    rows = torch.tensor([t * E + e for t in kept for e in range(E)]) % 16
    got = rb.decision_rows(rows, hold)
    assert got.tolist() == [decision(t, e) * E % 16 + e for t in kept for e in range(E)]
    assert got.tolist() != rows.tolist()
    torch.manual_seed(0)
    b = rb.sample(500, hold, gamma, hold)
    for i in range(500):
        t, e = int(b["obs"][i]), int(b["reward"][i] >= 100)
        assert phase[t, e] == 0 and t in kept
        k = next(j + 1 for j in range(hold) if t + j + 1 == T or t + j in ends[e] or j + 1 == hold)
        assert b["reward"][i].item() == pytest.approx(sum(gamma**j * (t + j + 1) * 100**e for j in range(k)))


def test_critic_sees_the_residual_in_its_own_units():
    """--critic-sees-residual: besides [x, a] the critic's first layer gets (a - a_base) / scale, a_base being the
    last act_dim entries of x: a residual of 0.05 in action units under a 0.1 bound arrives as 0.5."""
    SoftQNetwork = importlib.import_module("sac_residual").SoftQNetwork
    qf = SoftQNetwork(5, 2, 8, True, residual_scale=0.1)
    seen = []
    qf.net[0].register_forward_pre_hook(lambda _, inp: seen.append(inp[0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 0.2, -0.4]])  # s (3), a_base (2)
    a = torch.tensor([[0.25, -0.45]])
    assert qf(x, a).shape == (1, 1)
    torch.testing.assert_close(seen[0], torch.tensor([[1.0, 2.0, 3.0, 0.2, -0.4, 0.25, -0.45, 0.5, -0.5]]))
    assert SoftQNetwork(5, 2, 8, True).net[0].in_features == 7


train, checkpoint = SAC.train, SAC.checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sac")
    out = train(tmp_path, "--base", "expert", "--total-timesteps", "300", "--eval-freq", "200", "--exp-name", "t",
                "--residual-l2-final", "0.02", "--residual-l2-decay-steps", "100", "--eval-ema", "0.9",
                "--residual-dims", "0", "1", "2", "6", "--num-q", "3", "--residual-hold", "2", "--n-step", "2",
                "--critic-sees-residual", "--reward-lateral", "10")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path, out


def test_training_writes_checkpoint_and_scalars(trained):
    tmp_path, out = trained
    run_dir, ckpt = checkpoint(tmp_path, "t")
    assert ckpt["global_step"] == 300 and ckpt["base"] == "expert" and ckpt["args"]["total_timesteps"] == 300
    assert {k.split(".")[0] for k in ckpt["qfs"]} == {"0", "1", "2"}  # --num-q 3
    # --critic-sees-residual: the critics read [s, task features, a_base], the action and the residual in its units
    obs_dim = common.STATE_DIM + common.TASK_FEATURE_DIM + 7
    assert ckpt["qfs"]["0.net.0.weight"].shape[1] == obs_dim + 2 * 7
    assert ckpt["num_updates"] == int(0.5 * (300 - 100))  # utd 0.5 after the warm-up, plus the critic warm-up
    assert ckpt["rb"]["ptr"] == 300  # states stored with their task features
    assert ckpt["rb"]["data"]["obs"].shape == (300, common.STATE_DIM + common.TASK_FEATURE_DIM)
    for key in ("actor", "qfs", "qfs_target", "q_optimizer", "actor_optimizer", "a_optimizer",
                "log_alpha", "obs_rms", "rng", "eval_base"):
        assert key in ckpt
    assert ckpt["obs_rms"]["count"] > 99  # statistics of the 100 base-only warm-up steps
    # --residual-dims 0 1 2 6: the actor's heads have those 4 outputs (and --evaluate below reads them from the
    # checkpoint's args: no --residual-dims on its command line)
    assert tuple(ckpt["args"]["residual_dims"]) == (0, 1, 2, 6) and ckpt["actor"]["mean.weight"].shape[0] == 4
    # --residual-hold 2: the stored phases alternate within each episode, and a phase-1 step executes the residual
    # of the step before it (where neither action was clipped: there, action - a_base is the residual)
    rb = ckpt["rb"]["data"]
    phase, done = rb["phase"][:, 0], rb["done"][:, 0]
    assert phase[0] == 0 and torch.equal(phase[1:], torch.where(done[:-1] > 0, 0.0, 1.0 - phase[:-1]))
    res, free = rb["action"] - rb["a_base"], (rb["action"].abs() < 0.999).all(-1)
    held = (phase[1:] == 1) & free[1:] & free[:-1] & (res[:-1].abs().sum(-1) > 0)
    assert held.sum() > 20
    assert torch.allclose(res[1:][held], res[:-1][held], atol=1e-5)
    assert not torch.allclose(res[1:][phase[1:] == 0], res[:-1][phase[1:] == 0], atol=1e-5)
    tags = scalars(run_dir)
    for key in ("eval/success_at_end", "eval/success_once", "eval/return", "eval_base/success_at_end",
                "train/success_once", "reward/grasp", "reward/insert", "losses/qf1_loss", "losses/actor_loss",
                "losses/alpha", "residual/base_action_norm", "residual/residual_action_norm", "charts/SPS"):
        assert key in tags, key
    # the L2 weight moves from 0.1 to 0.02 over the 100 env steps after --learning-starts 100, then stays
    assert [(s, round(v, 6)) for s, v in tags["losses/residual_l2"]] == [(150, 0.06), (200, 0.02), (250, 0.02),
                                                                          (300, 0.02)]
    # The untrained residual is exactly the base: its first evaluation equals the base alone.
    assert tags["eval/success_at_end"][0] == tags["eval_base/success_at_end"][0] == (0, 1.0)
    # --eval-ema: every evaluation also runs the actor itself (eval_raw/), on the same episodes; the two start equal
    assert [s for s, _ in tags["eval_raw/return"]] == [s for s, _ in tags["eval/return"]] == [0, 200, 300]
    assert tags["eval_raw/return"][0] == tags["eval/return"][0]
    assert tags["eval_raw/return"][-1] != tags["eval/return"][-1]
    assert "step 300/300" in out.stdout


def test_evaluate_checkpoint_prints_json(trained):
    tmp_path, _ = trained
    run_dir, _ = checkpoint(tmp_path, "t")
    out = run("sac_residual.py", "--base", "expert", "--evaluate", "--checkpoint", run_dir / "ckpt.pt",
              "--num-eval-envs", "1", "--num-eval-episodes", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["eval/episodes"] == 1 and 0 <= stats["eval/success_at_end"] <= 1
    # the run was trained with --eval-ema: --evaluate runs the averaged actor, as the run's own evaluations did (same
    # seed and eval envs, so the same episode), not the actor itself; and with --reward-lateral 10, which --evaluate
    # also takes from the checkpoint (its return would differ by the lateral term otherwise)
    tags = scalars(run_dir)
    assert stats["eval/return"] == pytest.approx(tags["eval/return"][-1][1], abs=1e-3)
    assert stats["eval/return"] != pytest.approx(tags["eval_raw/return"][-1][1], abs=1e-3)


def test_resuming_an_older_buffer_layout_is_a_clear_error(trained, tmp_path):
    """Checkpoints whose replay buffer holds bare states (before the task features were stored with them) still
    evaluate, but cannot resume training: one line that says why."""
    run_dir, ckpt = checkpoint(trained[0], "t")
    for key in ("obs", "next_obs"):
        ckpt["rb"]["data"][key] = ckpt["rb"]["data"][key][:, : common.STATE_DIM]
    old = tmp_path / "old.pt"
    common.save_checkpoint(str(old), ckpt)
    # (--n-step 2: the checkpoint's residual is held for 2 steps, and its targets must bootstrap at a decision)
    assert_one_line_error(train(tmp_path, "--base", "expert", "--total-timesteps", "400", "--n-step", "2",
                                "--checkpoint", old),
                          f"holds {common.STATE_DIM}-dim states")


def test_actor_drift_reads_a_checkpoint(trained, tmp_path):
    """benchmarks/actor_drift.py on the run's checkpoint (three critics, a residual held for 2 steps: measured on its
    decision states, about half of the 300), and on a copy whose actor is reset to output zero: its residual is then
    nowhere, and the critics score its action exactly as the base's."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    drift = importlib.import_module("actor_drift").drift
    run_dir, ckpt = checkpoint(trained[0], "t")
    assert drift(str(run_dir / "ckpt.pt"), 300)["states"] == int((ckpt["rb"]["data"]["phase"] == 0).sum()) < 300
    row = drift(str(run_dir / "ckpt.pt"), 100)
    assert row["num_q"] == 3 and row["states"] == 100 and row["residual_dims"] == [0, 1, 2, 6]
    assert row["residual_hold"] == 2
    assert 0 < min(row["mean_abs_tanh_mean"]) and row["td_error_rms"] > 0
    assert row["min_q_at_actor"] != row["min_q_at_base"] and row["q_range_over_residual_box"] > 0
    assert row["critics_spread_at_actor"] > 0
    for k in ("mean.weight", "mean.bias"):
        ckpt["actor"][k].zero_()
    zero = tmp_path / "zero.pt"
    common.save_checkpoint(str(zero), ckpt)
    row = drift(str(zero), 100)
    assert row["mean_abs_tanh_mean"] == [0.0] * 4 and row["min_q_at_actor"] == row["min_q_at_base"]


def test_saved_trajectories_replay_with_maniskill(trained):
    """The data flywheel: successful episodes in ManiSkill's format, replayed by ManiSkill's own tool."""
    import h5py

    tmp_path, _ = trained
    run_dir, _ = checkpoint(tmp_path, "t")
    traj = tmp_path / "flywheel"
    out = run("sac_residual.py", "--base", "expert", "--evaluate", "--checkpoint", run_dir / "ckpt.pt",
              "--num-eval-envs", "1", "--num-eval-episodes", "1", "--save-trajectories", traj)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["eval/saved_episodes"] == 1  # the expert succeeds
    meta = json.loads((traj / "trajectories.json").read_text())
    assert meta["instruction"] == common.INSTRUCTION and meta["episodes"][0]["success"]
    with h5py.File(traj / "trajectories.h5") as f:
        assert f["traj_0/base_actions"].shape == f["traj_0/actions"].shape == (100, 7)
        assert f["traj_0/residual_actions"].shape == (100, 7) and "obs" in f["traj_0"]
        a_res = torch.as_tensor(f["traj_0/residual_actions"][:])
    # the run's --residual-dims 0 1 2 6: the residual moved those dimensions and left the rotation exactly alone
    assert (a_res[:, 3:6] == 0).all() and (a_res[:, [0, 1, 2, 6]] != 0).all(-1).any()
    replay = subprocess.run([sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", "--traj-path",
                             str(traj / "trajectories.h5"), "-b", "physx_cpu"], capture_output=True, text=True,
                            timeout=600)
    assert "Replayed 1 episodes, 1/1=100.00% demos saved" in replay.stdout + replay.stderr


def as_before_the_critic_ensemble(ckpt):
    """A checkpoint in the layout written before --num-q: two critics under their own names."""
    for key in ("qfs", "qfs_target"):
        members = ckpt.pop(key)
        for i, name in enumerate(("qf1", "qf2")):
            ckpt[name + key[3:]] = {k[2:]: v for k, v in members.items() if k.startswith(f"{i}.")}
    del ckpt["args"]["num_q"], ckpt["args"]["num_q_target"]


def test_resume_is_exact(tmp_path):
    """Same seed: N+M steps in one run equal N steps, then M more resumed from the checkpoint (with the averaged
    actor of --eval-ema, and pink exploration noise: its sequences restart with the envs at the checkpoint). The
    half-way checkpoint is rewritten in the layout from before --num-q: older checkpoints resume, and exactly."""
    args = ["--base", "coarse", "--eval-freq", "150", "--seed", "3", "--eval-ema", "0.9", "--noise-beta", "1"]
    (_, a), (_, b) = SAC.resume_pair(tmp_path, args, 300, 150, edit=as_before_the_critic_ensemble)
    assert a["global_step"] == b["global_step"] == 300 and a["num_updates"] == b["num_updates"]
    for net in ("actor", "actor_ema", "qfs", "qfs_target"):
        assert_same_tensors(a[net], b[net], net)
    assert torch.equal(a["rb"]["data"]["reward"], b["rb"]["data"]["reward"])
    assert torch.equal(a["rb"]["data"]["action"], b["rb"]["data"]["action"])
    assert torch.equal(a["log_alpha"], b["log_alpha"])
    # the noise was pink: once the residual is on at every step (from 150), consecutive residuals of the one env are
    # correlated (white noise around a near-zero young mean: about 0)
    res = (a["rb"]["data"]["action"] - a["rb"]["data"]["a_base"])[150:]
    lag1 = torch.stack([torch.corrcoef(torch.stack([d[:-1], d[1:]]))[0, 1] for d in res.T])
    assert lag1.mean() > 0.3, lag1


@pytest.mark.parametrize("beta, std, lag1", [(0.0, 1.0, 0.0), (1.0, 1.055, 0.67), (2.0, 1.146, 0.965)])
def test_colored_noise_has_the_variance_and_correlation_of_its_colour(beta, std, lag1):
    """--noise-beta's sequences: the std and the correlation of neighbouring steps that
    colorednoise.powerlaw_psd_gaussian gives for 100 steps (measured on 20,000 of its sequences: so the policy's std
    keeps its meaning), and the same sequences from the same generator seed (what exact resume relies on)."""
    colored_noise = importlib.import_module("sac_residual").colored_noise
    x = colored_noise(beta, (4000, 2), 100, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2, 100)
    assert x.std().item() == pytest.approx(std, abs=0.02)
    corr = torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()
    assert corr == pytest.approx(lag1, abs=0.02)
    assert torch.equal(x, colored_noise(beta, (4000, 2), 100, generator=torch.Generator().manual_seed(0)))


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    code, err = interrupt_after("sac_residual.py", tmp_path, "step 50/", *TINY, "--base", "zero",
                                "--total-timesteps", "100000", "--exp-name", "intr")
    assert code == 130 and "Traceback" not in err and "saving" in err
    _, ckpt = checkpoint(tmp_path, "intr")
    assert ckpt["global_step"] >= 50


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = train(tmp_path, "--base", "zero", "--total-timesteps", "3000", "--eval-freq", "50", "--q-lr", "1e12",
                "--exp-name", "nan")
    assert out.returncode == 1 and "non-finite loss" in out.stderr and "Traceback" not in out.stderr
    _, ckpt = checkpoint(tmp_path, "nan")
    assert all(torch.isfinite(v).all() for v in ckpt["qfs"].values())
