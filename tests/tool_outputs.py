"""Run several command-line invocations in one Python process and print what each wrote.

    python tests/tool_outputs.py OUT.json '[["train_snac.py", "--help"], ["-m", "training.codec", "agree", "--help"]]'

writes to OUT.json a list with one ``{"code": exit status, "stdout": text}`` per invocation. Each one
runs as its own ``__main__`` (``runpy``: a script path as ``python SCRIPT``, ``-m MODULE`` as
``python -m MODULE``) with its ``sys.argv`` and ``sys.path[0]`` set as Python would set them.

test_docs checks some 25 documented tools against their ``--help``; one process that imports torch
once answers all of them, where a process per tool would spend about 1.7 s each importing it. The
tools' own start-up (a real process each, empty stderr) is checked by test_startup.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import traceback
import warnings


def run_one(argv) -> dict:
    out = io.StringIO()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.path.insert(0, os.getcwd())
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (a crash is this invocation's result, not the batch's)
        code = 1
        out.write(traceback.format_exc())
    finally:
        sys.argv, sys.path = saved_argv, saved_path
    return {"code": code, "stdout": out.getvalue()}


if __name__ == "__main__":
    results = [run_one(argv) for argv in json.loads(sys.argv[2])]
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(results, f)
