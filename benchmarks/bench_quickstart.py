"""The quickstart grid end to end: ``stackwise run experiments/quickstart.yaml`` (one small rack
trained layer-wise, stack-wise and end to end, 900 steps each, on the built-in corpus), timed
from the command's start to its exit, with each run's validation loss and own training time.

The command runs as a subprocess into a temporary MLflow store (``--tracking-uri``) with
``--set training.device=<--device>``, so nothing is added to the project's store; the runs are
read back with ``stackwise compare --format json``. The wall time includes everything a user
waits for: start-up, data preparation, the three trainings and their tracking.

Run: ``python benchmarks/bench_quickstart.py [--device cuda]`` (results: ``bench_quickstart.json``,
on CUDA ``bench_quickstart_cuda.json``). ``--quick``: 6 steps per run on 20,000 tokens of data
(for tests). No goal: the figure is the time a first run takes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _device
import torch
from _report import headline, publish

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "quickstart.yaml"
QUICK_SETTINGS = ("training.budget.steps=6", "training.eval.every_steps=3", "data.max_tokens=20000")


def cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`stackwise <args>` with this interpreter; a failure stops the benchmark with its error."""
    done = subprocess.run(
        [sys.executable, "-m", "stackwise", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench_quickstart: stackwise {args[0]} failed:\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _device.add_arguments(parser, precision=False)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the grid")
    parser.add_argument("--quick", action="store_true", help="6 steps per run, little data")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    _device.check(parser, args)
    settings = [f"training.device={args.device}", *(QUICK_SETTINGS if args.quick else ())]
    overrides = [part for setting in settings for part in ("--set", setting)]
    threads = ["--threads", "1"] if args.quick else []
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as store:
        uri = ["--tracking-uri", str(Path(store) / "mlruns")]
        start = time.perf_counter()
        cli("run", str(EXPERIMENT), *overrides, *uri, *threads, "--quiet", timeout=args.timeout)
        wall = time.perf_counter() - start
        compared = cli(
            "compare", str(EXPERIMENT), *overrides, *uri, "--format", "json", timeout=120
        )
    rows = json.loads(compared.stdout)
    runs = {
        row["mode"]: {
            "val_loss": row["val_loss"],
            "wall_time_s": row["wall_time_s"],
            "tokens_per_s": row["tokens_per_s"],
            "status": row["status"],
        }
        for row in rows
    }
    steps = "6" if args.quick else "900"
    where = "CPU" if args.device == "cpu" else torch.cuda.get_device_name()
    result = {
        "benchmark": "bench_quickstart",
        "settings": {**vars(args), "overrides": settings},
        "wall_seconds": wall,
        "runs_wall_seconds": sum(run["wall_time_s"] for run in runs.values()),
        "runs": runs,
        "headline": [
            headline(
                f"Quickstart grid (`stackwise run experiments/quickstart.yaml`: {len(runs)} runs "
                f"of {steps} steps, d_model 64) from start to exit, on {where}",
                f"**{wall:.0f} s** (the runs' own time: "
                f"{sum(run['wall_time_s'] for run in runs.values()):.0f} s); val loss "
                + ", ".join(f"{mode} {run['val_loss']:.2f}" for mode, run in runs.items()),
                None,
                None,
            )
        ],
    }
    publish("bench_quickstart", result, args.out, quick=args.quick, device=args.device)


if __name__ == "__main__":
    main()
