"""Where a learned residual wins and loses, episode by episode: a trained residual SAC against the base alone and
against the hand-written lateral correction (oracle_residual.py's `lateral`), on the same evaluation episodes.

    python benchmarks/residual_diagnosis.py --checkpoint runs/<run>/ckpt.pt --num-episodes 100

The evaluation envs replay the same episodes for every policy (ManiSkill's protocol, reseeded), so the outcomes pair
up: of the episodes the base fails, how many does the residual fix, and of those it succeeds in, how many does the
residual break; and of the episodes the oracle fixes, how many the learned residual misses. Along the learned run it
also measures how much of the oracle's lateral correction the learned residual applies at the same states: the
projection gain sum(r . o) / sum(o . o) of its translation r on the oracle's o and their mean cosine, over the steps
the oracle acts (head within 6 cm of the face); the mean |residual| on the other (rotation, gripper) dimensions; and
the head's lateral offset from the hole axis when it first comes within 1 cm of the entrance, and at the end.
Writes benchmarks/results/residual_diagnosis_<name>.json (--out).
"""

import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """a sac_residual.py checkpoint"""
    num_episodes: int = 100
    """evaluation episodes per policy (the same episodes for each)"""
    seed: int = 0
    """seed of the evaluation episodes"""
    ema: bool = False
    """diagnose the averaged actor of --eval-ema instead of the actor itself"""
    out: Optional[str] = None
    """JSON output path (default benchmarks/results/residual_diagnosis_<run name>.json; 'none' to skip)"""


def lateral_oracle(obs, a_base, scale):
    """oracle_residual.py's `lateral` (gain 1): a proportional correction of the head's offset from the hole axis."""
    f = common.task_features(obs["state"])
    e_lat, near = f[:, :3] / 100, f[:, 3:4] > -6.0
    a_res = torch.zeros_like(a_base)
    a_res[:, :3] = torch.where(near, e_lat / (0.1 * common.CoarseBase.Config().track_frac) / scale, 0.0)
    return a_res.clamp(-1, 1)


@torch.no_grad()
def run(envs, base, num_episodes, seed, residual, scale):
    """common.evaluate's loop, keeping per-episode outcomes and per-step records of the residual against the oracle."""
    obs = envs.reset(seed=seed)
    base.reset(torch.ones(envs.num_envs, dtype=torch.bool, device=envs.device), seed=seed)
    n = envs.num_envs
    success, face_offset, end_offset = [], [], []
    at_face = torch.full((n,), float("nan"))
    dots = torch.zeros(4)  # sum r.o, sum o.o, number of steps the oracle acts, sum of cos(r, o) there
    rot = torch.zeros(2)  # sum |r_rotation|, steps
    episodes = 0
    while episodes < num_episodes:
        a_base = base(obs)
        f = common.task_features(obs["state"])
        lat_mm, depth = 10 * f[:, :3].norm(dim=-1), f[:, 3]
        reached = (depth > -1.0) & at_face.isnan()  # the head within 1 cm of the entrance for the first time
        at_face = torch.where(reached, lat_mm, at_face)
        a_res = torch.zeros_like(a_base) if residual is None else residual(obs, a_base)
        o = lateral_oracle(obs, a_base, scale)[:, :3]
        acts = o.abs().sum(-1) > 0
        cos = torch.nn.functional.cosine_similarity(a_res[:, :3], o, dim=-1)
        dots += torch.stack([(a_res[:, :3] * o).sum(-1)[acts].sum(), o.pow(2).sum(-1)[acts].sum(), acts.sum(),
                             cos[acts].sum()])
        rot += torch.stack([a_res[:, 3:].abs().sum(), torch.tensor(float(n))])
        obs, _, terminated, truncated, info = envs.step(common.compose_action(a_base, a_res, scale))
        done = terminated | truncated
        if done.any():
            base.reset(done)
            episodes += int(done.sum())
            end = 10 * common.task_features(info["final_obs"]["state"])[:, :3].norm(dim=-1)
            success.append(info["episode"]["success_at_end"][done].bool().cpu())
            face_offset.append(at_face[done.cpu()])
            end_offset.append(end[done].cpu())
            at_face = torch.where(done.cpu(), float("nan"), at_face)
    return dict(success=torch.cat(success)[:num_episodes], face_mm=torch.cat(face_offset)[:num_episodes],
                end_mm=torch.cat(end_offset)[:num_episodes], gain=(dots[0] / dots[1]).item(),
                oracle_steps=int(dots[2]), cos=(dots[3] / dots[2]).item(),
                rotation_mean_abs=(rot[0] / rot[1] / 4).item())


def median(x):
    x = x[~x.isnan()]
    return x.median().item() if len(x) else float("nan")


def main(args: Args):
    if args.num_episodes < 1:
        raise common.ConfigError(f"--num-episodes must be >= 1, got {args.num_episodes}")
    ckpt = common.load_checkpoint(args.checkpoint, "sac_residual.py")
    a = ckpt["args"]
    if args.ema and ckpt.get("actor_ema") is None:
        raise common.ConfigError(f"{args.checkpoint} has no averaged actor (trained without --eval-ema)")
    sac = importlib.import_module("sac_residual")
    envs = common.make_env(2, "physx_cpu", env_id=a["env_id"], control_mode=a["control_mode"], eval_mode=True,
                           seed=args.seed)
    try:
        act_dim, state_dim = envs.action_dim, envs.state_dim
        res_dim = state_dim + (common.TASK_FEATURE_DIM if a["task_features"] else 0)
        obs_dim = res_dim + (act_dim if a["residual_sees_base"] else 0)
        actor = sac.Actor(obs_dim, act_dim, a["hidden_dim"], a["init_std"], a.get("residual_dims"))
        actor.load_state_dict(ckpt["actor_ema" if args.ema else "actor"])
        obs_rms = common.RunningMeanStd(res_dim)
        obs_rms.load_state_dict(ckpt["obs_rms"])
        scale = a["residual_scale"]

        def learned(obs, a_base):
            s = obs_rms.normalize(common.residual_state(obs["state"], a["task_features"]))
            x = torch.cat([s, a_base], -1) if a["residual_sees_base"] else s
            return actor.expand(actor(x)[0].tanh())

        base = common.make_base_policy(ckpt["base"], envs, seed=args.seed)
        policies = dict(base=None, learned=learned, oracle=lambda obs, a_base: lateral_oracle(obs, a_base, scale))
        runs = {name: run(envs, base, args.num_episodes, args.seed, fn, scale) for name, fn in policies.items()}
    finally:
        envs.close()
    b, l, o = (runs[k]["success"] for k in ("base", "learned", "oracle"))
    lr = runs["learned"]
    result = dict(
        checkpoint=args.checkpoint, global_step=ckpt["global_step"], actor="ema" if args.ema else "actor",
        num_episodes=args.num_episodes, seed=args.seed,
        success_at_end={k: v["success"].float().mean().item() for k, v in runs.items()},
        learned_fixes_base_failures=int((~b & l).sum()), learned_breaks_base_successes=int((b & ~l).sum()),
        base_failures=int((~b).sum()), base_successes=int(b.sum()),
        oracle_fixes_learned_misses=int((o & ~l).sum()), learned_succeeds_oracle_fails=int((l & ~o).sum()),
        learned_gain_on_oracle_lateral=lr["gain"], learned_cos_to_oracle_lateral=lr["cos"],
        oracle_active_steps=lr["oracle_steps"], learned_rotation_mean_abs=lr["rotation_mean_abs"],
        lateral_mm_at_face={k: {"success": median(v["face_mm"][v["success"]]),
                                "failure": median(v["face_mm"][~v["success"]])} for k, v in runs.items()},
        lateral_mm_at_end={k: {"success": median(v["end_mm"][v["success"]]),
                               "failure": median(v["end_mm"][~v["success"]])} for k, v in runs.items()},
        device=f"CPU, {os.cpu_count()} cores", command="python " + " ".join(sys.argv),
    )
    print(json.dumps(result, indent=2))
    name = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"residual_diagnosis_{name}.json")
    if out != "none":
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    common.exit_on_config_error(lambda: main(tyro.cli(Args)))
