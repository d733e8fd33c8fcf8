"""Residual composition, checkpoints, running mean/std, logging."""

import os
import signal

import pytest
import torch

import common


def test_compose_adds_scaled_residual_and_clips():
    a_base = torch.tensor([[0.5, -0.95, 0.0]])
    a_res = torch.tensor([[1.0, -1.0, 0.5]])
    out = common.compose_action(a_base, a_res, scale=0.1)
    torch.testing.assert_close(out, torch.tensor([[0.6, -1.0, 0.05]]))  # -1.05 clipped to the action bound


def test_zero_residual_reproduces_the_base_exactly():
    a_base = torch.rand(64, 7) * 2 - 1
    # A freshly initialised residual head outputs exactly 0 (zero last layer, tanh(0) = 0).
    head = torch.nn.Linear(50, 7)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    a_res = torch.tanh(head(common.residual_obs(torch.randn(64, 43), a_base)))
    assert torch.equal(common.compose_action(a_base, a_res, scale=0.3), a_base)


def test_residual_obs_is_state_then_base_action():
    s, a = torch.randn(3, 43), torch.randn(3, 7)
    obs = common.residual_obs(s, a)
    assert obs.shape == (3, 50) and torch.equal(obs[:, :43], s) and torch.equal(obs[:, 43:], a)


@pytest.mark.parametrize("shape,dtype", [((1, 4), torch.float32), ((256, 4), torch.float32),
                                         ((5, 3, 4), torch.float64)])
def test_quaternion_to_matrix_is_maniskills_bit_for_bit(shape, dtype):
    from mani_skill.utils.geometry.rotation_conversions import quaternion_to_matrix as maniskill_q2m

    q = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)  # unnormalised on purpose
    R = common.quaternion_to_matrix(q)
    assert R.shape == (*shape[:-1], 3, 3) and R.dtype == dtype
    assert torch.equal(R, maniskill_q2m(q))
    u = q / q.norm(dim=-1, keepdim=True)  # and it is a rotation
    torch.testing.assert_close(common.quaternion_to_matrix(u) @ common.quaternion_to_matrix(u).transpose(-1, -2),
                               torch.eye(3, dtype=dtype).expand(*shape[:-1], 3, 3))


def test_scripts_take_ctrl_c_even_when_started_with_it_ignored():
    """As a background job of a non-interactive shell is: Ctrl-C must still stop the run before its loop starts."""
    seen = []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as exit_info:
            common.exit_on_config_error(lambda: (seen.append(signal.getsignal(signal.SIGINT)),
                                                 signal.raise_signal(signal.SIGINT)))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.default_int_handler] and exit_info.value.code == 130


def test_checkpoint_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, dict(script="sac_residual.py", base="coarse", step=5, w=torch.arange(3)))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # the temporary file was renamed away
    ckpt = common.load_checkpoint(path, "sac_residual.py", base="coarse")
    assert ckpt["step"] == 5 and torch.equal(ckpt["w"], torch.arange(3))
    with pytest.raises(common.ConfigError, match="not found"):
        common.load_checkpoint(str(tmp_path / "missing.pt"), "sac_residual.py")
    with pytest.raises(common.ConfigError, match="written by sac_residual.py, not ppo_residual.py"):
        common.load_checkpoint(path, "ppo_residual.py")
    with pytest.raises(common.ConfigError, match="trained on base 'coarse', not 'expert'"):
        common.load_checkpoint(path, "sac_residual.py", base="expert")
    (tmp_path / "corrupt.pt").write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(common.ConfigError, match="corrupt"):
        common.load_checkpoint(str(tmp_path / "corrupt.pt"), "sac_residual.py")
    torch.save([1, 2], tmp_path / "foreign.pt")
    with pytest.raises(common.ConfigError, match="not a checkpoint of this repository"):
        common.load_checkpoint(str(tmp_path / "foreign.pt"), "sac_residual.py")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, dict(script="x", step=1))

    def crash(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, dict(script="x", step=2))
    monkeypatch.undo()
    assert common.load_checkpoint(path, "x")["step"] == 1


def test_running_mean_std_matches_batch_statistics_and_resumes():
    x = torch.randn(1000, 5) * torch.arange(1, 6) + 3
    rms = common.RunningMeanStd(5)
    for chunk in x.split(128):
        rms.update(chunk)
    torch.testing.assert_close(rms.mean.float(), x.mean(0), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(rms.var.float(), x.var(0, unbiased=False), atol=1e-2, rtol=1e-3)
    other = common.RunningMeanStd(5)
    other.load_state_dict(rms.state_dict())
    assert other.count == rms.count
    torch.testing.assert_close(other.normalize(x), rms.normalize(x))
    assert rms.normalize(x * 100).abs().max() <= 5.0  # clipped


def test_rng_state_round_trip():
    common.seed_everything(3)
    state = common.rng_state()
    a = torch.rand(4)
    common.set_rng_state(state)
    assert torch.equal(torch.rand(4), a)


def test_logger_writes_tensorboard_scalars(tmp_path, monkeypatch):
    import argparse

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    logger = common.Logger("demo", argparse.Namespace(seed=1))
    logger.log({"eval/success_at_end": 0.25}, step=10)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "runs" / "demo"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/success_at_end")] == [(10, 0.25)]


def test_env_workers_fork_from_a_server_that_imported_the_script(tmp_path):
    """common._start_forkserver: the forkserver imports torch, ManiSkill, common and the running script itself (by
    module name), so CPU env workers start without importing them again. Python's own preload of "__main__" skips
    it: a worker then had to re-run the script afresh and only ever knew it as "__mp_main__"."""
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "myscript.py").write_text(f"""
import multiprocessing, sys
sys.path.insert(0, {ROOT!r})
import common

def report(conn):  # in the worker
    conn.send(["myscript" in sys.modules, "common" in sys.modules])

if __name__ == "__main__":
    common._start_forkserver()
    parent, child = multiprocessing.Pipe()
    worker = multiprocessing.get_context("forkserver").Process(target=report, args=(child,))
    worker.start()
    print(parent.recv(), flush=True)
    worker.join()
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    print("libtorch" in open(f"/proc/{{server}}/maps").read())
""")
    out = subprocess.run([sys.executable, "myscript.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[True, True]", "True"]
