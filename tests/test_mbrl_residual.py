"""mbrl_residual.py: the ensemble fits known dynamics, imagined rollouts stop where they must, and end to end as a
subprocess with a tiny budget (train, evaluate, resume exactly)."""

import json

import pytest
import torch
from conftest import Script, assert_same_tensors, run, scalars
from test_cli import assert_one_line_error

import common

from mbrl_residual import DynamicsEnsemble, imagine, staged_reward_of_state, tail_grasp_of_state

TINY = ["--num-envs", "1", "--num-eval-envs", "1", "--num-eval-episodes", "1", "--batch-size", "32",
        "--hidden-dim", "32", "--learning-starts", "100", "--critic-warmup-updates", "5", "--log-freq", "50",
        "--progressive-steps", "50", "--buffer-size", "10000", "--model-train-freq", "50", "--model-updates", "10",
        "--model-hidden-dim", "16", "--rollout-batch-size", "20"]


MBRL = Script("mbrl_residual.py", TINY)


def test_ensemble_fits_known_dynamics():
    """s' = s + 0.1 * a, a_base' = tanh(s[:2]), r = -|s|^2, done = s_0 > 1.5: held-out error far below the data's
    variance, and the termination classified."""
    torch.manual_seed(0)
    n, e = 4096, 3
    s, a_base, a = torch.randn(n, 4), torch.rand(n, 2) * 2 - 1, torch.rand(n, 2) * 2 - 1
    x = torch.cat([s, a_base, a], -1)
    y = torch.cat([0.1 * torch.cat([a, a], -1), torch.tanh(s[:, :2]), -(s**2).sum(-1, keepdim=True)], -1)
    done = (s[:, 0] > 1.5).float()
    model = DynamicsEnsemble(e, 8, 7, 64)
    model.fit_scalers(x[:3584], y[:3584])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(600):
        idx = torch.randint(0, 3584, (e, 256))
        loss, _ = model.loss(x[idx], y[idx], done[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mean, std, term_p = model.predict(x[3584:])
    err = (((mean - y[3584:]) / model.y_std) ** 2).mean(dim=(0, 1))  # standardised: predicting the mean scores 1
    assert (err[:6] < 0.01).all() and err[6] < 0.25, err  # the quadratic reward is the hardest target
    assert ((term_p.mean(0) > 0.5).float() == done[3584:]).float().mean() > 0.97
    assert std.shape == mean.shape == (e, 512, 7) and (std > 0).all()


class FakeModel:
    """Two members over a 2-dim state: rollouts 0, 2, 4 terminate at once, rollout 1's members disagree."""

    x_std = torch.ones(2)
    y_std = torch.ones(4)  # [s' - s (2), a_base' (1), r]

    def predict(self, x):
        n = x.shape[0]
        mean = torch.zeros(2, n, 4)
        mean[:, :, :2] = 0.01  # the state moves a little
        mean[1, 1, :2] = 1.0  # member 1 disagrees about rollout 1
        mean[:, :, 3] = -0.5  # the reward
        term_p = torch.zeros(2, n)
        term_p[:, 0::2] = 1.0
        return mean, torch.zeros(2, n, 4), term_p


def test_imagined_rollouts_stop_at_termination_and_disagreement():
    state, a_base = torch.zeros(6, 2), torch.zeros(6, 1)
    out, stats = imagine(FakeModel(), lambda s, b: torch.zeros_like(b), state, a_base, horizon=3,
                         max_disagreement=0.1, scale=0.1)
    # 3 terminating rollouts give 1 transition each, the untrusted one none, the 2 others the full horizon
    assert out["obs"].shape == (9, 2) and out["next_obs"].shape == (9, 2) and out["action"].shape == (9, 1)
    assert out["reward"].shape == out["terminated"].shape == (9, 1)
    assert out["terminated"].sum() == 3 and (out["reward"] == -0.5).all()
    assert abs(stats["rollout_len"] - 9 / 6) < 1e-6 and abs(stats["rollout_kept"] - 9 / 18) < 1e-6
    # a continuing rollout's next state is the next step's state
    torch.testing.assert_close(out["next_obs"][out["terminated"][:, 0] == 0][:2], torch.full((2, 2), 0.01))


def test_imagined_rewards_can_be_computed_from_the_predicted_state():
    """--model-reward staged: each kept step's reward is reward_fn(its next state, its termination), not the model's."""
    out, _ = imagine(FakeModel(), lambda s, b: torch.zeros_like(b), torch.zeros(6, 2), torch.zeros(6, 1), horizon=3,
                     max_disagreement=0.1, scale=0.1, reward_fn=lambda s, done: 100 * s[:, 0] + done.float())
    assert out["reward"].shape == (9, 1) and (out["reward"] != -0.5).all()
    torch.testing.assert_close(out["reward"], 100 * out["next_obs"][:, :1] + out["terminated"])


def peg_state(tcp_x, finger_gap):
    """A 43-dim PegInsertionSide state: peg at the origin along world x (half length 0.1, radius 0.01), the TCP at
    (tcp_x, 0, 0), the fingers' joint positions summing to `finger_gap`, the hole 0.3 m ahead."""
    s = torch.zeros(1, 43)
    s[0, common.QPOS][7:9] = finger_gap / 2
    s[0, common.TCP_POSE] = torch.tensor([tcp_x, 0, 0, 1, 0, 0, 0])
    s[0, common.PEG_POSE] = torch.tensor([0, 0, 0, 1, 0, 0, 0.0])
    s[0, common.PEG_HALF_SIZE] = torch.tensor([0.1, 0.01, 0.01])
    s[0, common.HOLE_POSE] = torch.tensor([0.3, 0, 0, 1, 0, 0, 0.0])
    s[0, common.HOLE_RADIUS] = 0.0115
    return s


def test_tail_grasp_is_read_from_the_state():
    assert tail_grasp_of_state(peg_state(-0.05, 0.021))  # fingers closed on the peg (0.02 wide), on its tail half
    assert not tail_grasp_of_state(peg_state(-0.05, 0.08))  # open
    assert not tail_grasp_of_state(peg_state(0.05, 0.021))  # on the head half
    cfg = common.StagedRewardConfig(d3=10)
    held, success = peg_state(-0.05, 0.021), torch.tensor([False])
    terms = common.staged_reward_terms(held, torch.tensor([True]), success, cfg)
    assert staged_reward_of_state(held, success, cfg) == pytest.approx(float(sum(terms.values())))
    assert float(terms["stage"]) != cfg.stage_offsets[0]  # held: past the grasp stage
    assert staged_reward_of_state(held, torch.tensor([True]), cfg) == pytest.approx(cfg.r_success)


def test_train_evaluate_and_resume_exactly(tmp_path):
    (run_dir, ckpt), (_, b) = MBRL.resume_pair(tmp_path, ["--base", "coarse", "--eval-freq", "150", "--seed", "3",
                                                          "--reward-lateral", "5"], 300, 150)
    for key in ("model", "model_optimizer", "model_rb", "rb", "actor", "qf1", "obs_rms", "rng", "next_model_train"):
        assert key in ckpt
    assert ckpt["model_rb"]["ptr"] > 0  # imagined transitions were made
    tags = scalars(run_dir)
    for key in ("model/train_loss", "model/val_loss", "model/val_state_mse", "model/disagreement",
                "model/rollout_kept", "eval/success_at_end", "eval_base/success_at_end", "losses/qf1_loss"):
        assert key in tags, key
    # the cut is recalibrated every round (every 50 steps from step 100 here), never above --max-disagreement
    cuts = [v for _, v in tags["model/cut_threshold"]]
    assert len(cuts) >= 4 and all(0 < v <= 0.1 for v in cuts) and len(set(cuts)) > 1
    assert all(-1 <= v <= 1 for _, v in tags["model/val_disagreement_error_corr"])
    assert ckpt["global_step"] == b["global_step"] == 300 and ckpt["num_updates"] == b["num_updates"]
    for net in ("actor", "qf1", "model"):
        assert_same_tensors(ckpt[net], b[net], net)
    assert torch.equal(ckpt["model_rb"]["data"]["next_obs"], b["model_rb"]["data"]["next_obs"])
    out = run("mbrl_residual.py", "--base", "coarse", "--evaluate", "--checkpoint", run_dir / "ckpt.pt",
              "--num-eval-envs", "1", "--num-eval-episodes", "1", "--seed", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    # the run's last evaluation again (same seed and eval envs), with --reward-lateral 5 from the checkpoint (not the
    # default 10)
    assert stats["eval/episodes"] == 1 and stats["eval/return"] == pytest.approx(tags["eval/return"][-1][1], abs=1e-3)
    # a checkpoint of the previous version (its replay buffer has no episode-end field for n-step returns) evaluates
    # (above) but cannot resume training: one line that says why
    del ckpt["rb"]["data"]["done"]
    old = tmp_path / "old.pt"
    common.save_checkpoint(str(old), ckpt)
    assert_one_line_error(MBRL.train(tmp_path, "--base", "coarse", "--total-timesteps", "400", "--checkpoint", old),
                          "is from an older mbrl_residual.py (its replay buffer has no 'done' field)")
