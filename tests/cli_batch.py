"""Run scripts' command lines, one case after another in one interpreter, so that the imports (torch, ManiSkill:
~8 s of CPU) are paid once rather than once per case. Each case runs its script's real entry point (the
`if __name__ == "__main__":` block, through runpy) and records its exit code, what it wrote to stderr, and how many
processes it started (the CPU simulator envs are multiprocessing processes; a command line rejected before any env
starts starts none). An exception that escapes is recorded as a traceback, as the interpreter would print it.
Prints JSON on stdout.

    python tests/cli_batch.py '[["sac_residual.py", ["--num-envs", "0"]], ["ppo_residual.py", ["--evaluate"]]]'
"""

import contextlib
import io
import json
import multiprocessing
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # what `python script.py` does for the script's folder


def count_starts(start):
    def counted(process):
        counted.n += 1
        return start(process)

    counted.n = 0
    return counted


if __name__ == "__main__":
    multiprocessing.process.BaseProcess.start = count_starts(multiprocessing.process.BaseProcess.start)
    results = []
    for script, argv in json.loads(sys.argv[1]):
        err, starts = io.StringIO(), multiprocessing.process.BaseProcess.start.n
        sys.argv = [os.path.join(ROOT, script), *argv]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except BaseException:  # noqa: BLE001 - recorded as the interpreter would report it
                traceback.print_exc()
                code = 1
        results.append(dict(script=script, argv=argv, returncode=code, stderr=err.getvalue(),
                            processes_started=multiprocessing.process.BaseProcess.start.n - starts))
    print(json.dumps(results))
