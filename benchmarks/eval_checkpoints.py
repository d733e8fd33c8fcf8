"""Re-evaluate trained checkpoints on more episodes than a learning curve's points, all on the same episodes.

A curve's point rests on 50 episodes (one standard error about 0.06 near 0.8). This runs `<script> --evaluate
--checkpoint C --seed S --num-eval-episodes N` for every checkpoint, and the base alone on the very same episodes
(benchmarks/base_policy.py with the eval envs' seed, S + 10,000), so that every pair of results is paired episode for
episode. Pick a --seed that no curve evaluated on (theirs were the runs' seeds, 1-4) for fresh episodes. Runs
--parallel evaluations at a time (each starts its own 2 CPU env processes) and writes <out>.json as results come; a
rerun with the same seed and episodes skips the labels that file already has.

    python benchmarks/eval_checkpoints.py --out benchmarks/results/sac_residual_200k_eval200 \\
        --checkpoints gamma0.8_s2=benchmarks/runs/runs/<run>/ckpt.pt default_s2=benchmarks/runs/runs/<run>/ckpt.pt
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    checkpoints: list[str] = field(default_factory=list)
    """label=path pairs, one per checkpoint"""
    script: str = "sac_residual.py"
    """the script that wrote the checkpoints"""
    base: str = "coarse"
    """the base they were trained on (also evaluated alone)"""
    seed: int = 100
    """the evaluation's seed: the eval envs start from seed + 10,000, as in the scripts"""
    num_eval_episodes: int = 200
    """episodes per checkpoint"""
    parallel: int = 2
    """evaluations at a time"""
    out: str = "benchmarks/results/eval_checkpoints"
    """output prefix (.json)"""


def last_json_line(text):
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run(label, cmd):
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"error: {label}: {' '.join(cmd[1:])} failed: {out.stderr.strip().splitlines()[-1:]}")
    stats = {k.removeprefix("eval/"): v for k, v in last_json_line(out.stdout).items()}
    return {**stats, "label": label, "command": " ".join(cmd[1:]), "wall_s": time.time() - start}


def save(path, report):
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)


def main(args: Args):
    jobs = [("base alone", [sys.executable, "benchmarks/base_policy.py", "--base", args.base, "--seed",
                            str(args.seed + 10_000), "--num-episodes", str(args.num_eval_episodes), "--out", "none"])]
    for item in args.checkpoints:
        label, sep, path = item.partition("=")
        if not sep or not os.path.exists(path):
            raise SystemExit(f"error: --checkpoints takes label=path pairs of existing files, got {item!r}")
        jobs.append((label, [sys.executable, args.script, "--evaluate", "--checkpoint", os.path.abspath(path),
                             "--base", args.base, "--seed", str(args.seed), "--num-eval-episodes",
                             str(args.num_eval_episodes)]))
    path = args.out + ".json"
    report = dict(seed=args.seed, num_eval_episodes=args.num_eval_episodes, device=f"CPU, {os.cpu_count()} cores", results=[])
    if os.path.exists(path):  # a rerun keeps what was measured with the same episodes and skips it
        old = json.load(open(path))
        if (old["seed"], old["num_eval_episodes"]) == (args.seed, args.num_eval_episodes):
            report["results"] = old["results"]
    done = {r["label"] for r in report["results"]}
    with ThreadPoolExecutor(args.parallel) as pool:
        for r in pool.map(lambda job: run(*job), [job for job in jobs if job[0] not in done]):
            report["results"].append(r)  # in order; saved as each one comes
            save(path, report)
    for r in report["results"]:
        print(f"{r['label']:>24}: success_at_end {r['success_at_end']:.3f}, success_once {r['success_once']:.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
