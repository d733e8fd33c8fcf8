"""demo_explore_sac.py end to end as a subprocess with a tiny budget: train, BC alone, evaluate, exact resume (with
IBRL and the averaged actor).
(Apart from the demonstration-file tests so that the two halves run on two workers.)"""

import json

import pytest
import torch
from conftest import assert_same_tensors, run, scalars
from test_demo_explore_sac import DEMO, HIDDEN, demos  # noqa: F401  (demos: the module fixture)

from demo_explore_sac import SearchClock


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The bare command (no --demos): generates the default set under demos/ first, then trains (with the staged
    reward's lateral term)."""
    tmp_path = tmp_path_factory.mktemp("demo_sac")
    out = DEMO.train(tmp_path, "--num-demos", "2", "--total-timesteps", "300", "--eval-freq", "200", "--exp-name", "t",
                     "--reward-lateral", "5")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path, out


def test_training_writes_checkpoint_and_scalars(trained):
    tmp_path, out = trained
    run_dir, ckpt = DEMO.checkpoint(tmp_path, "t")
    assert ckpt["global_step"] == 300 and ckpt["base"] == "expert" and ckpt["args"]["env_id"] == HIDDEN
    assert ckpt["num_updates"] == int(0.5 * (300 - 100))
    assert ckpt["demos"]["demos/episodes"] == 2 and ckpt["rb"]["data"]["obs"].shape == (300, 46 + SearchClock.DIM)
    for key in ("actor", "qf1", "qf2", "qf1_target", "qf2_target", "q_optimizer", "actor_optimizer", "obs_rms",
                "rng", "eval_base"):
        assert key in ckpt
    tags = scalars(run_dir)
    for key in ("eval/success_at_end", "eval/success_once", "eval/median_steps_to_success", "eval_base/success_at_end",
                "losses/bc_loss", "losses/bc_coef", "losses/bc_pretrain_loss", "losses/actor_loss", "demos/episodes",
                "demos/transitions", "reward/insert", "residual/residual_action_norm", "charts/SPS"):
        assert key in tags, key
    assert [s for s, _ in tags["eval/success_at_end"]] == [0, 200, 300]  # after BC, then every eval
    assert "step 300/300" in out.stdout and "demonstrations: 2 episodes" in out.stdout
    assert "generating 2 scripted search demonstrations" in out.stdout
    assert (tmp_path / "demos" / f"spiral_{HIDDEN}_dart0.05.h5").is_file()  # DART by default


def test_evaluate_checkpoint_prints_json(trained):
    tmp_path, _ = trained
    run_dir, _ = DEMO.checkpoint(tmp_path, "t")
    out = run("demo_explore_sac.py", "--evaluate", "--checkpoint", run_dir / "ckpt.pt", "--num-eval-envs", "1",
              "--num-eval-episodes", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["eval/episodes"] == 1 and 0 <= stats["eval/success_at_end"] <= 1
    assert "eval/median_steps_to_success" in stats
    # the run's last evaluation again (same seed and eval envs), with --reward-lateral 5 from the checkpoint (its
    # return would differ by the lateral term otherwise)
    assert stats["eval/return"] == pytest.approx(scalars(run_dir)["eval/return"][-1][1], abs=1e-3)


@pytest.fixture(scope="module")
def bc_alone(trained):
    """A second bare command finds the cached default set; with --total-timesteps 0 it is behaviour cloning on the
    demonstrations alone (the first of them), evaluated once."""
    tmp_path, _ = trained
    out = DEMO.train(tmp_path, "--num-demos", "1", "--total-timesteps", "0", "--exp-name", "bc")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path, out


def test_bc_alone_reuses_the_cached_demos(bc_alone):
    tmp_path, out = bc_alone
    assert "generating" not in out.stdout
    run_dir, ckpt = DEMO.checkpoint(tmp_path, "bc")
    assert ckpt["global_step"] == 0 and ckpt["demos"]["demos/episodes"] == 1
    tags = scalars(run_dir)
    assert [s for s, _ in tags["eval/success_at_end"]] == [0] and "losses/bc_pretrain_loss" in tags


def test_resume_is_exact_with_ibrl_and_the_averaged_actor(bc_alone, tmp_path):
    """Same seed: N+M steps in one run equal N steps, then M more resumed from the checkpoint, with every optional
    network on. --ibrl: the BC-pretrained residual is kept, frozen, beside the RL one (its weights are BC-alone's:
    same demonstrations, same seed), the RL one moves away from it, and the share of steps that took BC's action is
    logged. --eval-ema: the averaged actor trails the actor, and it is the one evaluations and --evaluate run."""
    bc_dir = bc_alone[0]
    # 60-step episodes (evaluations are most of this test's env steps): the checkpoint at 150 still falls mid-episode
    args = ["--demos", bc_dir / "demos" / f"spiral_{HIDDEN}_dart0.05.h5", "--num-demos", "1", "--eval-freq", "150",
            "--max-episode-steps", "60"]
    (full_dir, a), (_, b) = DEMO.resume_pair(tmp_path, [*args, "--ibrl", "--eval-ema", "0.9"], 300, 150)
    assert a["global_step"] == b["global_step"] == 300 and a["num_updates"] == b["num_updates"]
    for net in ("actor", "bc_actor", "actor_ema", "qf1", "qf2", "qf1_target"):
        assert_same_tensors(a[net], b[net], net)
    assert torch.equal(a["rb"]["data"]["reward"], b["rb"]["data"]["reward"])
    ema = a["actor_ema"]["mean.weight"]
    assert torch.isfinite(ema).all() and not torch.equal(ema, a["actor"]["mean.weight"])
    bc_actor = DEMO.checkpoint(bc_dir, "bc")[1]["actor"]
    assert_same_tensors(a["bc_actor"], bc_actor, "bc_actor")
    assert not torch.equal(a["actor"]["mean.weight"], bc_actor["mean.weight"])  # RL trained the other one
    assert not torch.equal(ema, bc_actor["mean.weight"])  # the average left the BC start, behind the actor
    tags = scalars(full_dir)
    share = [v for _, v in tags["residual/ibrl_bc_share"]]
    assert share and all(0.0 <= v <= 1.0 for v in share), share

    # --evaluate evaluates the averaged actor: with the raw actor's output saturated it prints what the run's own
    # last evaluation logged (same seed, so the same episode)
    raw = torch.load(full_dir / "ckpt.pt", weights_only=False)
    raw["actor"]["mean.bias"] = torch.full_like(raw["actor"]["mean.bias"], 100.0)  # tanh: +1 on every dimension
    torch.save(raw, tmp_path / "raw_actor_saturated.pt")
    out = run("demo_explore_sac.py", "--evaluate", "--checkpoint", tmp_path / "raw_actor_saturated.pt",
              "--num-eval-envs", "1", "--num-eval-episodes", "1", "--max-episode-steps", "60")
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert tags["eval/return"][-1][0] == 300
    assert stats["eval/return"] == pytest.approx(tags["eval/return"][-1][1], abs=1e-3)
    assert stats["eval/success_at_end"] == tags["eval/success_at_end"][-1][1]
