"""Bad input to every training script: a clear one-line error and exit code 2, never a traceback."""

import pytest
from conftest import run

import common

SCRIPTS = ["sac_residual.py", "ppo_residual.py", "mbrl_residual.py"]
OTHER = {"sac_residual.py": "ppo_residual.py", "ppo_residual.py": "sac_residual.py", "mbrl_residual.py": "sac_residual.py"}


def assert_one_line_error(out, message):
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-envs", "0"], "--num-envs must be >= 1"),
        (["--residual-scale", "-1"], "--residual-scale must be > 0"),
        (["--checkpoint", "/no/such/ckpt.pt"], "checkpoint not found"),
        (["--evaluate"], "--evaluate needs --checkpoint"),
        (["--base", "gr00t"], "unknown --base"),
        (["--base", "coarse:hole_pos_std=abc"], "bad --base option"),
        (["--save-trajectories", "x"], "--save-trajectories needs --evaluate"),
        (["--num-envs", "512", "--sim-backend", "physx_cpu"], "--num-envs"),
    ],
)
def test_bad_inputs_are_one_line_errors(script, args, message):
    assert_one_line_error(run(script, *args), message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_from_another_script_or_base(script, tmp_path):
    foreign = tmp_path / "other.pt"
    common.save_checkpoint(str(foreign), dict(script=OTHER[script], base="coarse"))
    assert_one_line_error(run(script, "--checkpoint", foreign), f"written by {OTHER[script]}, not {script}")
    mine = tmp_path / "mine.pt"
    common.save_checkpoint(str(mine), dict(script=script, base="expert"))
    assert_one_line_error(run(script, "--base", "coarse", "--evaluate", "--checkpoint", mine),
                          "trained on base 'expert', not 'coarse'")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert_one_line_error(run(script, "--checkpoint", corrupt), "corrupt")
