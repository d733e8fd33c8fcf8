"""Bad input to the training scripts: a clear one-line error and exit code 2, never a traceback.

Each script's own validation is checked for every script; what goes through common.py (base specs, env limits,
checkpoint loading) once, on sac_residual.py, besides common.py's unit tests.
"""

import pytest
from conftest import run

import common

SCRIPTS = ["sac_residual.py", "ppo_residual.py", "mbrl_residual.py", "affordance_ppo.py", "demo_explore_sac.py"]


def assert_one_line_error(out, message):
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-envs", "0"], "--num-envs must be >= 1"),
        (["--residual-scale", "-1"], "--residual-scale must be > 0"),
        (["--evaluate"], "--evaluate needs --checkpoint"),
        (["--save-trajectories", "x"], "--save-trajectories needs --evaluate"),
    ],
)
def test_each_script_checks_its_arguments(script, args, message):
    assert_one_line_error(run(script, *args), message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_from_another_script(script, tmp_path):
    other = "ppo_residual.py" if script != "ppo_residual.py" else "sac_residual.py"
    foreign = tmp_path / "other.pt"
    common.save_checkpoint(str(foreign), dict(script=other, base="coarse"))
    assert_one_line_error(run(script, "--checkpoint", foreign), f"written by {other}, not {script}")


def test_noise_repeat_must_be_positive():
    assert_one_line_error(run("ppo_residual.py", "--noise-repeat", "0"), "--noise-repeat must be >= 1")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--disagreement-quantile", "0"], "--disagreement-quantile must be in (0, 1], got 0.0"),
        (["--n-step", "0"], "--n-step must be >= 1, got 0"),
    ],
)
def test_mbrl_cut_and_n_step_are_checked(args, message):
    assert_one_line_error(run("mbrl_residual.py", *args), message)


def test_residual_l2_schedule_must_be_non_negative():
    assert_one_line_error(run("sac_residual.py", "--residual-l2-final", "-0.1"),
                          "--residual-l2 and --residual-l2-final must be >= 0")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "/no/such/ckpt.pt"], "checkpoint not found"),
        (["--base", "gr00t"], "unknown --base"),
        (["--base", "coarse:hole_pos_std=abc"], "bad --base option"),
        (["--num-envs", "512", "--sim-backend", "physx_cpu"], "use --num-envs"),
    ],
)
def test_common_errors_reach_the_command_line(args, message):
    assert_one_line_error(run("sac_residual.py", *args), message)


def test_checkpoint_of_another_base_or_corrupt(tmp_path):
    mine = tmp_path / "mine.pt"
    common.save_checkpoint(str(mine), dict(script="sac_residual.py", base="expert"))
    assert_one_line_error(run("sac_residual.py", "--base", "coarse", "--evaluate", "--checkpoint", mine),
                          "trained on base 'expert', not 'coarse'")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert_one_line_error(run("sac_residual.py", "--checkpoint", corrupt), "corrupt")
