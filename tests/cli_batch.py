"""Run one script's command line with several argument lists in one interpreter, so its imports (torch, ManiSkill:
~8 s of CPU) are paid once rather than once per case. Each case runs the script's real entry point (its
`if __name__ == "__main__":` block, through runpy) and records its exit code and what it wrote to stderr; an
exception that escapes is recorded as a traceback, as the interpreter would print it. Prints JSON on stdout.

    python tests/cli_batch.py sac_residual.py '[["--num-envs", "0"], ["--evaluate"]]'
"""

import contextlib
import io
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # what `python script.py` does for the script's folder

if __name__ == "__main__":
    script, cases = os.path.join(ROOT, sys.argv[1]), json.loads(sys.argv[2])
    results = []
    for argv in cases:
        err = io.StringIO()
        sys.argv = [script, *argv]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except BaseException:  # noqa: BLE001 - recorded as the interpreter would report it
                traceback.print_exc()
                code = 1
        results.append(dict(argv=argv, returncode=code, stderr=err.getvalue()))
    print(json.dumps(results))
