"""Mean training success over windows of env steps, read from the progress lines a script prints (its log).

    python benchmarks/train_success.py benchmarks/results/logs/sac_residual_pink_s1.log \
        --windows 25000-75000 75000-125000

A window lo-hi averages the `train success_once` of the progress lines with lo < step <= hi (each line: the episodes
that ended in the preceding --log-freq steps).
"""

import re
import sys
from dataclasses import dataclass, field
from typing import Annotated

import tyro

LINE = re.compile(r"^step (\d+)/\d+ .*train success_once ([\d.]+|nan)")


@dataclass
class Args:
    logs: Annotated[tuple[str, ...], tyro.conf.Positional]
    """log files of sac_residual.py / ppo_residual.py / mbrl_residual.py runs"""
    windows: tuple[str, ...] = field(default_factory=lambda: ("5000-25000", "25000-75000", "75000-125000"))
    """env-step windows lo-hi"""


def main(args: Args):
    try:
        bounds = [tuple(int(x) for x in w.split("-")) for w in args.windows]
    except ValueError:
        sys.exit(f"error: --windows must look like 25000-75000, got {' '.join(args.windows)}")
    for path in args.logs:
        try:
            text = open(path).read()
        except OSError as err:
            sys.exit(f"error: cannot read {path}: {err.strerror}")
        points = [(int(m[1]), float(m[2])) for m in map(LINE.match, text.splitlines()) if m and m[2] != "nan"]
        means = []
        for lo, hi in bounds:
            v = [s for step, s in points if lo < step <= hi]
            means.append(f"{lo}-{hi}: {sum(v) / len(v):.2f} ({len(v)} lines)" if v else f"{lo}-{hi}: none")
        print(f"{path}: " + ", ".join(means))


if __name__ == "__main__":
    main(tyro.cli(Args))
