"""Cost of MLflow logging during training: the same training with and without `MlflowLogger`.

A small rack is trained repeatedly on the built-in corpus, alternating between a plain trainer
and one with the MLflow logging callback writing to a real SQLite store in a temporary folder
(each logged round is its own MLflow run; the writer is closed — everything flushed — inside the
timed region). Two figures:

    overhead_ratio          median(logged wall time) / median(plain wall time) - 1
    hook_time_fraction      time spent inside the callback's hooks / training wall time

The first compares whole trainings, so it also contains noise of a shared machine; the second
measures exactly what the training thread pays for logging. The goal is <= 2%.

Printed as JSON and written to ``benchmarks/results/bench_logging_overhead.json``.

    python benchmarks/bench_logging_overhead.py [--steps 300 --rounds 3 --log-every 10]

``--quick``: 20 steps of a tiny rack, one round (seconds; for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from typing import Any

import torch
from _report import headline, publish

import stackwise
from stackwise.config.base import StackWiseConfig
from stackwise.data import build_data
from stackwise.model.architecture import create_rack_from_config
from stackwise.tracking.logger import MlflowLogger
from stackwise.tracking.store import default_tracking_uri, get_or_create_experiment, open_client
from stackwise.training.callbacks import TrainingCallback

HOOKS = ("on_train_start", "on_stage_start", "on_metrics", "on_stage_end", "on_train_end")


class TimedHooks(TrainingCallback):
    """Forwards every hook to `inner` and adds up the time spent there."""

    def __init__(self, inner: TrainingCallback) -> None:
        self.inner = inner
        self.seconds = 0.0
        for hook in HOOKS:
            setattr(self, hook, self._timed(getattr(inner, hook)))

    def _timed(self, method: Any) -> Any:
        def call(*args: Any) -> None:
            start = time.perf_counter()
            method(*args)
            self.seconds += time.perf_counter() - start

        return call


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", default="stackwise")
    parser.add_argument("--max-tokens", type=int, default=400_000, help="corpus tokens read")
    parser.add_argument("--quick", action="store_true", help="20 steps, one round (seconds)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.log_every, args.max_tokens = 20, 1, 5, 50_000
        args.d_model, args.seq_len, args.batch_size = 32, 32, 2
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # steadier timings on a shared machine
    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": args.d_model,
                "n_heads": 4,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
            },
            "training": {
                "training_architecture": args.mode,
                "budget": {"steps": args.steps},
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "log_every_steps": args.log_every,
                "device": "cpu",
                "eval": {"batches": 2, "every_steps": min(100, args.steps)},
            },
            "data": {"max_tokens": args.max_tokens},
        }
    )
    # As measured from the start: no final test evaluation.
    data = dataclasses.replace(build_data(config.data, config.training), test_loader=None)
    tokens_per_step = args.batch_size * args.seq_len

    with tempfile.TemporaryDirectory(prefix="bench-logging-") as folder:
        uri = default_tracking_uri(folder)
        client = open_client(uri)
        experiment_id = get_or_create_experiment(client, uri, "bench_logging_overhead")

        def train(logged: bool) -> tuple[float, float, int]:
            rack = create_rack_from_config(config)
            callbacks: list[TrainingCallback] = []
            timed = None
            if logged:
                run_id = client.create_run(experiment_id).info.run_id
                logger = MlflowLogger(client, run_id, tokens_per_step=tokens_per_step)
                timed = TimedHooks(logger)
                callbacks.append(timed)
            start = time.perf_counter()
            stackwise.train(config, callbacks=callbacks, data=data, rack=rack)
            if logged:
                close_start = time.perf_counter()
                logger.close()
                assert timed is not None
                timed.seconds += time.perf_counter() - close_start
            wall = time.perf_counter() - start
            metrics = 0
            if logged:
                metrics = len(client.get_metric_history(run_id, "train/loss"))
                client.set_terminated(run_id)
            return wall, (timed.seconds if timed else 0.0), metrics

        train(False)  # warm-up: imports, allocator, first-use compilation of kernels
        plain: list[float] = []
        logged: list[float] = []
        fractions: list[float] = []
        logged_points = 0
        for index in range(args.rounds):
            order = (False, True) if index % 2 == 0 else (True, False)
            for with_logging in order:
                wall, hook_seconds, points = train(with_logging)
                if with_logging:
                    logged.append(wall)
                    fractions.append(hook_seconds / wall)
                    logged_points = points
                else:
                    plain.append(wall)

    overhead = statistics.median(logged) / statistics.median(plain) - 1.0
    best_round = min(logged) / min(plain) - 1.0
    hook_fraction = statistics.median(fractions)
    met = overhead <= 0.02
    note = f"the logging hooks take {hook_fraction:.2%} of the training time" + (
        "; the rest of the difference between whole trainings is other load on the machine"
        if hook_fraction <= 0.02
        else " (a run this short logs often relative to its work)"
    )
    result = {
        "benchmark": "bench_logging_overhead",
        "steps": args.steps,
        "rounds": args.rounds,
        "log_every_steps": args.log_every,
        "training_architecture": args.mode,
        "train_loss_points_logged": logged_points,
        "plain_wall_s": plain,
        "logged_wall_s": logged,
        "overhead_ratio": overhead,
        "overhead_ratio_best_round": best_round,
        "hook_time_fraction": hook_fraction,
        "goal": "<= 0.02",
        "goal_met": met,
        "headline": [
            headline(
                f"MLflow tracking cost: the same {args.mode} training ({args.steps} steps, "
                f"d_model {args.d_model}) with and without the logging callback (SQLite store, "
                f"metrics every {args.log_every} steps), interleaved rounds, median",
                f"**{overhead:.1%}** wall-time overhead (fastest vs fastest round: "
                f"{best_round:.1%}); {hook_fraction:.2%} of training time spent "
                "inside the logging hooks",
                "<= 2 %",
                met,
                "" if met else note,
            )
        ],
    }
    publish("bench_logging_overhead", result, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
