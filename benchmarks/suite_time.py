"""Wall clock and CPU time of a command, every process it starts counted, with how busy the machine's cores were.

    python benchmarks/suite_time.py --out benchmarks/results/suite_time.json -- \
        python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder tests

`time` undercounts our test suite by about half: the CPU env workers are forks of multiprocessing's forkserver, which
nobody waits for, so their CPU time never reaches the shell. Here the command runs under a child subreaper (Linux
prctl PR_SET_CHILD_SUBREAPER): every orphaned descendant is re-parented to this process and reaped by it, so
RUSAGE_CHILDREN holds them all. /proc/stat is sampled every `--every` seconds for the busy fraction of all cores (the
whole machine's, so run it on an otherwise idle machine). Writes JSON: wall_s, cpu_user_s, cpu_sys_s, cores,
cpu_per_wall (cores kept busy by the command), busy (per sample) and busy_mean, returncode, the command and the last
lines of its output.
"""

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36


def cpu_ticks():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between /proc/stat samples")
    parser.add_argument("--tail", type=int, default=20, help="lines of the command's output kept in the JSON")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to time after --")
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("error: prctl(PR_SET_CHILD_SUBREAPER) failed: this needs Linux")

    busy, done = [], threading.Event()

    def sample():
        prev = cpu_ticks()
        while not done.wait(args.every):
            now = cpu_ticks()
            busy.append(round((now[0] - prev[0]) / max(now[1] - prev[1], 1), 3))
            prev = now

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.time()
    sampler.start()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines = (lines + [line.rstrip("\n")])[-args.tail:]
    returncode = proc.wait()
    while True:  # the orphans: forkserver children and whatever else outlived its parent
        try:
            os.wait()
        except ChildProcessError:
            break
    wall = time.time() - t0
    done.set()
    sampler.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = dict(
        command=command, returncode=returncode, wall_s=round(wall, 1), cpu_user_s=round(usage.ru_utime, 1),
        cpu_sys_s=round(usage.ru_stime, 1), cores=os.cpu_count(),
        cpu_per_wall=round((usage.ru_utime + usage.ru_stime) / wall, 3),
        busy_mean=round(sum(busy) / len(busy), 3) if busy else None, busy=busy, output_tail=lines,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("busy", "output_tail")}))
    sys.exit(returncode)


if __name__ == "__main__":
    main()
