"""A process that trains one grid point for a driver: ``python -m stackwise.executors.worker
TASK.json``, started by ``--jobs`` (one process) or by ``torchrun`` for ``--nproc`` (one process
per rank).

The task file (JSON, written by the driver) names the grid (`GridContext`), the point, the run
options, whether to wait for a point another process holds, the driver's working folder and
where to write the outcome. The outcome file is written by the process that ran the point (rank
0 under torchrun) and read back by the driver; a process that dies before writing it leaves the
driver to mark the point FAILED. Exit status: 0 when an outcome was written, 1 when a torchrun
launch cannot go on (a rank failed), 128 + signal when stopped by one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from stackwise.executors.messages import (
        in_folder,
        options_from_json,
        outcome_to_json,
        read_task,
        spec_from_json,
        write_outcome,
    )
    from stackwise.executors.point import run_point
    from stackwise.runner import GridContext
    from stackwise.training.distributed import launched_by_torchrun

    if len(argv) != 1:
        print("usage: python -m stackwise.executors.worker TASK.json", file=sys.stderr)
        return 2
    task = read_task(Path(argv[0]))
    context = GridContext(**task["context"])
    spec = spec_from_json(task["spec"])
    options = options_from_json(task["options"])
    result = Path(task["result"])
    with in_folder(task.get("cwd")):
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            from stackwise.executors.torchrun import run_point_on_ranks

            return run_point_on_ranks(context, spec, options, bool(task["wait"]), result)
        try:
            outcome = run_point(context, spec, options, wait=bool(task["wait"]))
        except KeyboardInterrupt as error:
            signum = getattr(error, "signum", 2)
            write_outcome(result, {"status": "killed", "message": "interrupted", "run_id": None})
            return 128 + int(signum)
        write_outcome(result, outcome_to_json(outcome))
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
