"""ppo_residual.py: GAE against a reference from the definition, and end to end as a subprocess with a tiny budget."""

import importlib
import json

import pytest
import torch
from conftest import Script, assert_same_tensors, interrupt_after, run, scalars

from ppo_residual import compute_gae

TINY = ["--num-envs", "1", "--num-eval-envs", "1", "--num-eval-episodes", "1", "--num-steps", "50",
        "--num-minibatches", "2", "--update-epochs", "2", "--hidden-dim", "32"]


PPO = Script("ppo_residual.py", TINY)
train, checkpoint = PPO.train, PPO.checkpoint


def gae_reference(rewards, values, next_values, terminated, dones, gamma, lam):
    """A_t = sum_l (gamma * lam)^l delta_{t+l} over the rest of t's episode inside the rollout (the definition)."""
    T, B = rewards.shape
    adv = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                bootstrap = 0.0 if terminated[k, b] else gamma * next_values[k, b].item()
                total += weight * (rewards[k, b].item() + bootstrap - values[k, b].item())
                if dones[k, b]:
                    break
                weight *= gamma * lam
            adv[t, b] = total
    return adv


@pytest.mark.parametrize("gamma, lam", [(0.97, 0.9), (0.99, 1.0), (0.5, 0.0)])
def test_gae_matches_the_definition(gamma, lam):
    g = torch.Generator().manual_seed(0)
    T, B = 12, 4
    rewards, values, next_values = (torch.randn(T, B, generator=g, dtype=torch.float64) for _ in range(3))
    dones = torch.rand(T, B, generator=g) < 0.25
    terminated = dones & (torch.rand(T, B, generator=g) < 0.5)  # some episodes end in success, some time out
    adv, ret = compute_gae(rewards, values, next_values, terminated.double(), dones.double(), gamma, lam)
    ref = gae_reference(rewards, values, next_values, terminated, dones, gamma, lam)
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, ref + values)


def test_gae_bootstraps_truncation_but_not_termination():
    ones = torch.ones(1, 2, dtype=torch.float64)
    adv, _ = compute_gae(rewards=ones, values=0 * ones, next_values=10 * ones, terminated=torch.tensor([[1.0, 0.0]]),
                         dones=ones, gamma=0.5, gae_lambda=0.9)
    assert adv.tolist() == [[1.0, 6.0]]  # success: r only; time limit: r + gamma * V(final observation)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of 300 steps in one run, and of 150 steps resumed to 300 (same seed), with exploration noise
    held for 30 steps (--noise-repeat). The checkpoint falls mid-episode (episodes last 100 steps), where the held
    noise's age must restart with the envs, so exact resume covers the held noise too. The residual acts on the
    translation only (--residual-dims 0 1 2), and the staged reward has the lateral term (--reward-lateral 10)."""
    tmp_path = tmp_path_factory.mktemp("ppo")
    return PPO.resume_pair(tmp_path, ["--base", "coarse", "--eval-freq", "150", "--seed", "3", "--noise-repeat", "30",
                                      "--residual-dims", "0", "1", "2", "--reward-lateral", "10"], 300, 150)


def test_training_writes_checkpoint_and_scalars(runs):
    (run_dir, ckpt), _ = runs
    assert ckpt["global_step"] == 300 and ckpt["iteration"] == 6 and ckpt["base"] == "coarse"
    for key in ("agent", "optimizer", "obs_rms", "return_rms", "rng", "eval_base", "args"):
        assert key in ckpt
    assert ckpt["obs_rms"]["count"] > 299 and ckpt["return_rms"]["count"] > 299  # one update per step
    # the residual's mean head starts at zero and has moved; the std is learned by default
    assert ckpt["agent"]["actor_mean.4.weight"].abs().sum() > 0
    # --residual-dims 0 1 2: three outputs (the evaluation test below reads them from the checkpoint's args)
    assert ckpt["agent"]["actor_logstd"].shape == (1, 3) and tuple(ckpt["args"]["residual_dims"]) == (0, 1, 2)
    tags = scalars(run_dir)
    for key in ("eval/success_at_end", "eval/success_once", "eval/return", "eval_base/success_at_end",
                "train/return", "reward/grasp", "reward/insert", "losses/value_loss", "losses/policy_loss",
                "losses/approx_kl", "losses/explained_variance", "residual/base_action_norm",
                "residual/residual_action_norm", "charts/SPS", "charts/SPS_over_env_SPS"):
        assert key in tags, key
    # The untrained residual is exactly the base: its first evaluation equals the base alone, return and all.
    assert tags["eval/return"][0] == tags["eval_base/return"][0] and tags["eval/return"][0][0] == 0
    assert [s for s, _ in tags["eval/success_at_end"]] == [0, 150, 300]


def test_held_noise_is_redrawn_only_when_due():
    """--noise-repeat: an env's noise is redrawn when its age is a multiple of the repeat (0 = episode start)."""
    from ppo_residual import hold_noise

    torch.manual_seed(0)
    noise = torch.full((5, 7), 5.0)
    out = hold_noise(noise, torch.tensor([0, 1, 3, 4, 6]), 3)
    assert torch.equal(out[[1, 3]], noise[[1, 3]])  # held
    assert (out[[0, 2, 4]] != 5.0).all() and out[[0, 2, 4]].abs().max() < 5.0  # fresh standard-normal draws
    assert torch.equal(hold_noise(noise, torch.arange(5), 1) != 5.0, torch.ones(5, 7, dtype=torch.bool))


@pytest.mark.parametrize("script", ["ppo_residual", "sac_residual"])
def test_residual_dims_put_the_residual_where_asked(script):
    """--residual-dims 1 4 6: the policy's 3 outputs land on action dimensions 1, 4, 6 and the others stay exactly 0."""
    module = importlib.import_module(script)
    make = (lambda *dims: module.Agent(5, 7, 8, 0.3, False, *dims)) if script == "ppo_residual" else (
        lambda *dims: module.Actor(5, 7, 8, 0.3, *dims))
    y = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    expected = torch.tensor([[0.0, 1, 0, 0, 2, 0, 3], [0, 4, 0, 0, 5, 0, 6]])
    assert torch.equal(make((1, 4, 6)).expand(y), expected)
    full = make()
    assert full.expand(torch.ones(2, 7)).shape == (2, 7)  # all dimensions by default


def test_resume_is_exact(runs):
    """Same seed: N+M steps in one run equal N steps, then M more resumed from the checkpoint."""
    (_, a), (_, b) = runs
    assert a["global_step"] == b["global_step"] == 300 and a["iteration"] == b["iteration"] == 6
    for part in ("agent", "obs_rms", "return_rms"):
        assert_same_tensors(a[part], b[part], part)


def test_evaluate_checkpoint_prints_json(runs):
    (run_dir, _), _ = runs
    out = run("ppo_residual.py", "--base", "coarse", "--evaluate", "--checkpoint", run_dir / "ckpt.pt",
              "--num-eval-envs", "1", "--num-eval-episodes", "1", "--seed", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["eval/episodes"] == 1 and 0 <= stats["eval/success_at_end"] <= 1
    # the same episode as the run's last evaluation (same seed and eval envs), on the task it learned: --evaluate
    # takes --reward-lateral 10 from the checkpoint (the return would differ by the lateral term otherwise)
    assert stats["eval/return"] == pytest.approx(scalars(run_dir)["eval/return"][-1][1], abs=1e-3)


def test_pi0_base_with_action_chunks(tmp_path, tiny_pi0):
    """The residual acts every step on top of the cached chunk of a (tiny) VLA, across episode ends (20-step
    episodes: rendered steps are what this test costs)."""
    out = train(tmp_path, "--base", f"pi0:{tiny_pi0}", "--total-timesteps", "50", "--eval-freq", "1000",
                "--exp-name", "pi0", "--max-episode-steps", "20")
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir, ckpt = checkpoint(tmp_path, "pi0")
    assert ckpt["base"] == f"pi0:{tiny_pi0}" and ckpt["global_step"] == 50
    tags = scalars(run_dir)
    assert tags["residual/base_action_norm"][0][1] > 0  # the VLA's actions reached the residual
    assert tags["train/episode_len"][0][1] == 20  # episodes ended (and restarted) during training


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """(With --fixed-std, which must stay at --init-std through the updates.)"""
    code, err = interrupt_after("ppo_residual.py", tmp_path, "step 50/", *TINY, "--base", "zero",
                                "--total-timesteps", "100000", "--fixed-std", "--init-std", "0.1", "--exp-name", "intr")
    assert code == 130 and "Traceback" not in err and "saving" in err
    _, ckpt = checkpoint(tmp_path, "intr")
    assert ckpt["global_step"] >= 50 and ckpt["agent"]["actor_mean.4.weight"].abs().sum() > 0  # it has learned
    torch.testing.assert_close(ckpt["agent"]["actor_logstd"].exp(), torch.full((1, 7), 0.1))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = train(tmp_path, "--base", "zero", "--total-timesteps", "1000", "--eval-freq", "50",
                "--learning-rate", "1e30", "--max-grad-norm", "1e30", "--exp-name", "nan")
    assert out.returncode == 1 and "non-finite loss" in out.stderr and "Traceback" not in out.stderr
    _, ckpt = checkpoint(tmp_path, "nan")
    assert all(torch.isfinite(v).all() for v in ckpt["agent"].values())
