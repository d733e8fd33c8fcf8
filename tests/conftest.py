import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub: models are built from configs
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402


# pytest-xdist's `--dist loadfile` hands whole files to its workers in collection order (with
# `--no-loadscope-reorder`; its default orders them by test count instead): the files that run scripts end to end
# go first, longest first, so that no long file starts last while the other workers sit idle; the quick unit-test
# files fill in at the end.
SLOWEST_FIRST = ["test_sac_residual.py", "test_ppo_residual.py", "test_affordance_ppo.py",
                 "test_demo_explore_training.py", "test_mbrl_residual.py", "test_cli.py", "test_demo_explore_sac.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_pi0(tmp_path_factory):
    from tiny_pi0 import build_tiny_pi0

    return build_tiny_pi0(str(tmp_path_factory.mktemp("pi0")))


@pytest.fixture
def sim():
    """One in-process physx_cpu PegInsertionSide env (batched torch API), for setting poses by hand."""
    env = common._make_maniskill(
        env_id=common.ENV_ID, num_envs=1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pose", images=False,
        camera_size=64, reward="staged", reward_cfg=common.StagedRewardConfig(), reconf=1,
    )
    env.reset(seed=0)
    yield env
    env.close()


def run(script, *args, timeout=600, cwd=ROOT):
    """Run a repository script as a subprocess; returns the CompletedProcess (stdout+stderr text)."""
    import subprocess

    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
        timeout=timeout, cwd=cwd,
    )


def run_batch(cases, cwd=ROOT):
    """Run each (script, argument list) of `cases`, all in one subprocess (tests/cli_batch.py: the imports are paid
    once), in the folder `cwd`; returns one CompletedProcess-like record per case (returncode, stderr,
    processes_started: how many processes it started), in order."""
    import json
    from types import SimpleNamespace

    out = run(os.path.join("tests", "cli_batch.py"), json.dumps([[s, [str(a) for a in c]] for s, c in cases]),
              cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return [SimpleNamespace(**r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def load_run(tmp_path, exp_name, script):
    """(run folder, checkpoint) of the run `exp_name` that `script` wrote under tmp_path/runs."""
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith(exp_name + "__")]
    return run_dir, common.load_checkpoint(str(run_dir / "ckpt.pt"), script)


def scalars(run_dir):
    """Tensorboard scalars of a run: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def interrupt_after(script, cwd, marker, *args):
    """Start `script`, send Ctrl-C once a stdout line starts with `marker`; returns (returncode, stderr)."""
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(marker):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


class Script:
    """A training script run as a subprocess with a tiny budget (`tiny` flags first), in a test's folder."""

    def __init__(self, name, tiny):
        self.name, self.tiny = name, list(tiny)

    def train(self, tmp_path, *extra):
        return run(self.name, *self.tiny, *extra, cwd=tmp_path)

    def checkpoint(self, tmp_path, exp_name):
        return load_run(tmp_path, exp_name, self.name)

    def resume_pair(self, tmp_path, args, total, half, edit=None):
        """Checkpoints of `total` steps in one run and of `half` steps resumed to `total` (same seed and args).
        `edit(ckpt)`, if given, rewrites the half-way checkpoint before it is resumed (e.g. into an older layout)."""
        full = self.train(tmp_path, *args, "--total-timesteps", total, "--exp-name", "full")
        first = self.train(tmp_path, *args, "--total-timesteps", half, "--exp-name", "half")
        assert full.returncode == 0 and first.returncode == 0, (full.stderr + first.stderr)[-3000:]
        half_dir, ckpt = self.checkpoint(tmp_path, "half")
        if edit is not None:
            edit(ckpt)
            common.save_checkpoint(str(half_dir / "ckpt.pt"), ckpt)
        resumed = self.train(tmp_path, *args, "--total-timesteps", total, "--checkpoint", half_dir / "ckpt.pt")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        # the resumed run continues in the half run's folder
        return self.checkpoint(tmp_path, "full"), self.checkpoint(tmp_path, "half")


def assert_same_tensors(a, b, what):
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}.{k} differs after resume"
