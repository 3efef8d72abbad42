"""Load: a grid of many tiny points run with `--jobs` against one SQLite store and against a
local `mlflow server` (SQLite behind it), side by side.

Each point trains a tiny rack for a few steps, so the run measures what the platform adds per
point: worker start, locks, run creation, logging, the comparison at the end. For each store
the benchmark checks what a user relies on — every point FINISHED exactly once, no metric step
logged twice, no "database is locked" reaching the output — and records the wall time per point
and the store's size.

Run: ``python benchmarks/bench_load.py [--points 200 --jobs 4]``
``--quick``: 8 points, 2 jobs (about a minute; for tests).
Goal: every point FINISHED once, no duplicate run or metric step, no lock error shown.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from _report import headline, publish


def write_grid(folder: Path, points: int) -> Path:
    """An experiment of `points` tiny runs (one per seed)."""
    document = {
        "name": "load",
        "seeds": list(range(points)),
        "model": {
            "d_model": 16,
            "n_heads": 2,
            "architecture": {"n_stacks": 1, "blocks_per_stack": 1},
        },
        "training": {
            "training_architecture": "rackwise",
            "budget": {"steps": 4},
            "batch_size": 2,
            "seq_len": 16,
            "log_every_steps": 1,
            "device": "cpu",
            "eval": {"batches": 1, "every_steps": 2},
        },
        "data": {"max_tokens": 5000},
        "tracking": {"log_model": False},
    }
    path = folder / "load.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`mlflow server` on 127.0.0.1 over a SQLite store in `folder` (its log: ``server.log``
    there); its URI once it answers."""
    import urllib.request

    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--default-artifact-root", (folder / "artifacts").as_uri(), "--workers", "2",
    ]  # fmt: skip
    with (folder / "server.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return process, uri
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("mlflow server did not answer in 180 s")


def check_store(uri: str, points: int) -> dict[str, Any]:
    """What the store holds: finished points, duplicates, repeated metric steps."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("load")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`stackwise.role` = 'point'",
        max_results=5000,
    )
    names = Counter(r.data.tags.get("stackwise.run_name") for r in runs)
    unfinished = [
        {
            "name": r.data.tags.get("stackwise.run_name"),
            "status": r.info.status,
            "error": r.data.tags.get("error", ""),
        }
        for r in runs
        if r.info.status != "FINISHED"
    ]
    repeated_steps = 0
    for run in runs:
        for key in ("train/loss", "val/loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            repeated_steps += len(steps) - len(set(steps))
    return {
        "point_runs": len(runs),
        "finished": sum(r.info.status == "FINISHED" for r in runs),
        "points_with_several_runs": sum(1 for count in names.values() if count > 1),
        "points_missing": points - len(names),
        "repeated_metric_steps": repeated_steps,
        "unfinished": unfinished,
    }


def run_load(folder: Path, grid: Path, uri: str, jobs: int, points: int) -> dict[str, Any]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    command = [sys.executable, "-m", "stackwise", "run", str(grid), "--jobs", str(jobs)]
    command += ["--tracking-uri", uri, "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    return {
        "exit_status": done.returncode,
        "output_tail": "" if done.returncode == 0 else output[-4000:],
        "wall_s": wall,
        "wall_per_point_s": wall / points,
        "lock_errors_shown": output.lower().count("database is locked"),
        "tracebacks_shown": output.count("Traceback"),
        **check_store(uri, points),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="8 points, 2 jobs")
    parser.add_argument(
        "--store", choices=("both", "sqlite", "server"), default="both", help="which store to load"
    )
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.points, args.jobs = 8, 2
    stores: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as temp:
        root = Path(temp)
        if args.store in ("both", "sqlite"):
            local = root / "sqlite"
            local.mkdir()
            grid = write_grid(local, args.points)
            database = local / "mlruns" / "mlflow.db"
            uri = f"sqlite:///{database}"
            stores["sqlite"] = run_load(local, grid, uri, args.jobs, args.points)
            stores["sqlite"]["store_bytes"] = database.stat().st_size
        if args.store in ("both", "server"):
            served = root / "server"
            served.mkdir()
            grid = write_grid(served, args.points)
            process, uri = start_server(served)
            try:
                stores["server"] = run_load(served, grid, uri, args.jobs, args.points)
                if stores["server"]["exit_status"] != 0:
                    log = (served / "server.log").read_text(encoding="utf-8", errors="replace")
                    stores["server"]["server_log_tail"] = log[-4000:]
            finally:
                process.terminate()
                process.wait(timeout=60)
            stores["server"]["store_bytes"] = (served / "server.db").stat().st_size
    met = all(
        s["exit_status"] == 0
        and s["finished"] == args.points
        and s["points_with_several_runs"] == s["points_missing"] == 0
        and s["repeated_metric_steps"] == s["lock_errors_shown"] == s["tracebacks_shown"] == 0
        for s in stores.values()
    )
    figure = "; ".join(
        f"{name}: {s['finished']}/{args.points} FINISHED, {s['points_with_several_runs']} "
        f"duplicated, {s['repeated_metric_steps']} repeated steps, {s['lock_errors_shown']} lock "
        f"errors shown, **{s['wall_per_point_s']:.2f} s per point**, store "
        f"{s['store_bytes'] / 2**20:.1f} MiB"
        for name, s in stores.items()
    )
    report = {
        "benchmark": "bench_load",
        "settings": vars(args),
        "stores": stores,
        "goal": "every point FINISHED once, no repeated metric step, no lock error shown",
        "goal_met": met,
        "headline": [
            headline(
                f"Load: {args.points} tiny points, `--jobs {args.jobs}`, one SQLite store vs a "
                "local `mlflow server` (SQLite behind it)",
                figure,
                "all FINISHED once, no duplicates, no lock errors shown",
                met,
                "" if met else "see the JSON: the store check that failed",
            )
        ],
    }
    publish("bench_load", report, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
