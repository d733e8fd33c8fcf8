"""Bad input to the training scripts: a clear one-line error and exit code 2, never a traceback, and before any
simulator process starts.

Each script's own validation is checked for every script; what goes through common.py (base specs, checkpoint
loading) once, on sac_residual.py, besides common.py's unit tests. All these cases run in one subprocess
(tests/cli_batch.py, each script's real entry point once per case): a fresh interpreter per case spent ~8 s of CPU
on imports, ~60 times. The last test runs real subprocesses, one per case, as a user would.
"""

import pytest
from conftest import run, run_batch

import common

SCRIPTS = ["sac_residual.py", "ppo_residual.py", "mbrl_residual.py", "affordance_ppo.py", "demo_explore_sac.py"]
EVERY_SCRIPT = [
    (["--num-envs", "0"], "--num-envs must be >= 1"),
    (["--residual-scale", "-1"], "--residual-scale must be > 0"),
    (["--evaluate"], "--evaluate needs --checkpoint"),
    (["--save-trajectories", "x"], "--save-trajectories needs --evaluate"),
    (["--max-episode-steps", "0"], "--max-episode-steps must be >= 1"),
    (["--num-envs", "512", "--sim-backend", "physx_cpu"], "use --num-envs"),  # 512 simulator processes
    (["--reward", "dense"], "unknown --reward 'dense': choose staged, normalized_dense or sparse"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
]
ONE_SCRIPT = [
    ("ppo_residual.py", ["--noise-repeat", "0"], "--noise-repeat must be >= 1"),
    ("ppo_residual.py", ["--residual-dims", "3", "3"], "--residual-dims must be distinct action dimensions"),
    ("mbrl_residual.py", ["--disagreement-quantile", "0"], "--disagreement-quantile must be in (0, 1], got 0.0"),
    ("mbrl_residual.py", ["--n-step", "0"], "--n-step must be >= 1, got 0"),
    ("sac_residual.py", ["--residual-l2-final", "-0.1"], "--residual-l2 and --residual-l2-final must be >= 0"),
    ("sac_residual.py", ["--eval-ema", "1"], "--eval-ema must be in [0, 1)"),
    ("sac_residual.py", ["--noise-beta", "-1"], "--noise-beta must be >= 0"),
    ("sac_residual.py", ["--num-q", "1"], "--num-q must be >= 2"),
    ("sac_residual.py", ["--residual-hold", "0"], "--residual-hold must be >= 1"),
    ("sac_residual.py", ["--critic-sees-residual", "--no-residual-sees-base"], "--critic-sees-residual needs"),
    ("sac_residual.py", ["--reward-lateral", "-1"], "--reward-lateral must be >= 0, got -1.0"),
    ("ppo_residual.py", ["--reward-lateral", "-1"], "--reward-lateral must be >= 0, got -1.0"),
    ("mbrl_residual.py", ["--reward-lateral", "-0.5"], "--reward-lateral must be >= 0, got -0.5"),
    ("demo_explore_sac.py", ["--reward-lateral", "-2"], "--reward-lateral must be >= 0, got -2.0"),
    ("mbrl_residual.py", ["--model-reward", "exact"], "--model-reward must be learned or staged, got exact"),
    ("mbrl_residual.py", ["--model-reward", "staged", "--reward", "sparse"], "it needs --reward staged"),
    ("sac_residual.py", ["--residual-hold", "2"], "--n-step must be a multiple of --residual-hold"),
    ("sac_residual.py", ["--residual-dims", "0", "7"], "--residual-dims must be distinct action dimensions in [0, 7)"),
    # common.py's checks, as they reach the command line
    ("sac_residual.py", ["--checkpoint", "/no/such/ckpt.pt"], "checkpoint not found"),
    ("sac_residual.py", ["--base", "gr00t"], "unknown --base"),
    ("sac_residual.py", ["--base", "coarse:hole_pos_std=abc"], "bad --base option"),
]


def other_script(script):
    return "ppo_residual.py" if script != "ppo_residual.py" else "sac_residual.py"


def assert_one_line_error(out, message):
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case of this file but the last test's: {(script, args): outcome}, all in one subprocess. It runs in a
    scratch folder, without ./demos: demo_explore_sac.py generates its default demonstrations when they are not
    cached there, so a check made after that would start processes, as it would in a fresh clone."""
    tmp = tmp_path_factory.mktemp("cli")
    keys, cases = [], []
    for script in SCRIPTS:
        for args in [args for args, _ in EVERY_SCRIPT] + [args for s, args, _ in ONE_SCRIPT if s == script]:
            keys.append((script, tuple(args)))
            cases.append((script, args))
        foreign = tmp / f"from_{other_script(script)}.pt"  # a checkpoint written by another script
        common.save_checkpoint(str(foreign), dict(script=other_script(script), base="coarse"))
        keys.append((script, "foreign"))
        cases.append((script, ["--checkpoint", str(foreign)]))
    return dict(zip(keys, run_batch(cases, cwd=tmp)))


def assert_rejected_before_any_env(outcome, message):
    """The one-line error, raised before any simulator process started (the CPU envs are processes), unless the
    check needs an env: --residual-dims is checked against the env's action size."""
    assert_one_line_error(outcome, message)
    if outcome.argv[0] != "--residual-dims":
        assert outcome.processes_started == 0, f"it started {outcome.processes_started} processes"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, message", EVERY_SCRIPT)
def test_each_script_checks_its_arguments(outcomes, script, args, message):
    assert_rejected_before_any_env(outcomes[script, tuple(args)], message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_from_another_script(outcomes, script):
    assert_rejected_before_any_env(outcomes[script, "foreign"], f"written by {other_script(script)}, not {script}")


@pytest.mark.parametrize("script, args, message", ONE_SCRIPT)
def test_script_specific_and_common_checks(outcomes, script, args, message):
    assert_rejected_before_any_env(outcomes[script, tuple(args)], message)


def test_checkpoint_of_another_base_or_corrupt(tmp_path):
    """Real subprocesses, one per case: the error path of a fresh interpreter, as a user meets it."""
    mine = tmp_path / "mine.pt"
    common.save_checkpoint(str(mine), dict(script="sac_residual.py", base="expert"))
    assert_one_line_error(run("sac_residual.py", "--base", "coarse", "--evaluate", "--checkpoint", mine),
                          "trained on base 'expert', not 'coarse'")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert_one_line_error(run("sac_residual.py", "--checkpoint", corrupt), "corrupt")
