"""Start-up time of the commands that train nothing: `--help`, `validate`, `plan` and `compare`,
each a fresh process, against the imports they cannot avoid in the same run.

`validate` needs neither torch nor MLflow; `plan` needs torch for its exact activation estimate
(fake tensors, without PyTorch's compiler); `compare` needs polars but neither torch nor
MLflow (it reads a local SQLite store directly). Each command is timed from process start to exit on
the quickstart experiment (`compare` on a store holding its three runs, recorded first) and set
beside a bare ``python -c "import X"`` of what it needs, so the ratio shows the command's own
cost above its unavoidable imports.

Run: ``python benchmarks/bench_startup.py [--repeats 5]``
``--quick``: one repeat, and `compare` on the runs of a 4-step grid (seconds; for tests).
Goal: `compare`, `validate` and `plan` start in under 3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import headline, publish

REPOSITORY = Path(__file__).resolve().parent.parent
QUICKSTART = REPOSITORY / "experiments" / "quickstart.yaml"
GOAL_S = 3.0


def timed(command: list[str], cwd: Path, repeats: int) -> float:
    """Median wall seconds of `command` run `repeats` times (each must succeed)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="median of N starts per command")
    parser.add_argument("--quick", action="store_true", help="one repeat, a 4-step grid")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    python = sys.executable
    stackwise = [python, "-m", "stackwise"]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as temp:
        folder = Path(temp)
        record = [*stackwise, "run", str(QUICKSTART), "--quiet"]
        if args.quick:
            record += ["--set", "training.budget.steps=4", "--set", "training.eval.batches=1"]
        subprocess.run(record, cwd=folder, check=True, capture_output=True)
        compare = [*stackwise, "compare", str(QUICKSTART)]
        if args.quick:
            compare += ["--set", "training.budget.steps=4", "--set", "training.eval.batches=1"]
        commands = {
            "help": ([*stackwise, "--help"], [python, "-c", "import typer, rich"]),
            "validate": (
                [*stackwise, "validate", str(QUICKSTART)],
                [python, "-c", "import pydantic, yaml"],
            ),
            "plan": ([*stackwise, "plan", str(QUICKSTART)], [python, "-c", "import torch"]),
            "compare": (compare, [python, "-c", "import polars"]),
        }
        seconds = {}
        for name, (command, reference) in commands.items():
            own = timed(command, folder, args.repeats)
            base = timed(reference, folder, args.repeats)
            seconds[name] = {"command_s": own, "reference_s": base, "ratio": own / base}
    met = all(seconds[n]["command_s"] < GOAL_S for n in ("validate", "plan", "compare"))
    figure = "; ".join(
        f"{name} **{s['command_s']:.2f} s** ({s['ratio']:.2f}x its imports, "
        f"{s['reference_s']:.2f} s)"
        for name, s in seconds.items()
    )
    report = {
        "benchmark": "bench_startup",
        "settings": vars(args),
        "seconds": seconds,
        "goal": f"validate, plan and compare < {GOAL_S:g} s",
        "goal_met": met,
        "headline": [
            headline(
                "Start-up of commands that train nothing (fresh process to exit, quickstart; "
                "reference: a bare import of what the command needs: typer+rich, pydantic+yaml, "
                "torch, polars)",
                figure,
                f"< {GOAL_S:g} s",
                met,
                "" if met else _why_missed(seconds),
            )
        ],
    }
    publish("bench_startup", report, args.out, quick=args.quick)


def _why_missed(seconds: dict[str, dict[str, float]]) -> str:
    slow = [n for n in ("validate", "plan", "compare") if seconds[n]["command_s"] >= GOAL_S]
    parts = []
    for name in slow:
        s = seconds[name]
        parts.append(
            f"{name}: {s['reference_s']:.2f} s of its {s['command_s']:.2f} s are the imports it "
            "cannot do without"
            + (
                " (torch, for the fake tensors of the exact activation estimate)"
                if name == "plan"
                else ""
            )
        )
    return "; ".join(parts)


if __name__ == "__main__":
    main()
