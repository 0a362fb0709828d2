"""Run by tests/test_bad_inputs.py in ONE subprocess: the train entry points' bad-input cases, each
called in-process as `train_main(task, argv)` (the process group one train() sets up is reused, so the
cases cost one start-up instead of one each). Writes {case id: {code, stderr, traceback}} as JSON.

    python tests/faults/bad_train_inputs.py CASES.json RESULTS.json
"""

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path


def main(cases_path: str, results_path: str) -> None:
    from mm.cli import train_main

    results = {}
    for case in json.loads(Path(cases_path).read_text()):
        err = io.StringIO()
        code, tb = 0, ""
        with contextlib.redirect_stderr(err):
            try:
                code = train_main(case["task"], case["argv"])
            except SystemExit as e:
                code = e.code
            except BaseException:  # anything but the one-line UserError path is a failure of the case
                tb = traceback.format_exc()
                code = "exception"
        results[case["id"]] = {"code": code, "stderr": err.getvalue(), "traceback": tb}
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
