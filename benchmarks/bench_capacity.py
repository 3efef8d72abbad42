"""Capacity: under a fixed memory cap, the largest rack (by depth at a fixed width) that trains
rackwise and the largest that trains blockwise.

Each trial trains a rack of ``depth`` blocks for ``--steps-per-stage`` steps per stage in a fresh
process; depth doubles from ``--start-depth`` until a trial fails or ``--max-depth`` is reached.
The cap holds for the whole process (Python, torch, the rack, training):

- **cgroup** (where this process may create a memory cgroup below its own, v1 or v2): the trial
  runs in a new cgroup limited to the cap, swap included; the kernel stops it when it goes over.
  The cgroup's own peak usage is reported (it counts what the trial itself brings into memory:
  shared-library pages already loaded by other processes are charged to them, so it reads lower
  than the trial's RSS).
- **rss** (otherwise): the trial runs uncapped and fits when its peak resident set size (VmHWM)
  stays within the cap.

Training modes are listed once in `modes()`: rackwise, blockwise, and blockwise with
``training.out_of_core: true`` (blocks not yet trained are not materialised and finished ones live
on disk).

Run: ``python benchmarks/bench_capacity.py [--cap-mb 768 --d-model 256 --max-depth 4096]``
(about half an hour: out-of-core trials take time linear in depth). ``--quick``: a tiny rack at
depth 1 only (seconds; for tests). Writes the JSON (every trial's peak RSS and time) and a plot
of peak RSS against depth beside it.
Goals: the largest rack trainable depth-wise holds >= 64x the parameters of the largest rackwise
one, measured until a trial fails or to the stated depth limit (``--max-depth``); out-of-core
blockwise's peak RSS grows by at most 10 % from 4 to 512 blocks (memory flat in depth).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _report import RESULTS, headline, publish

GOAL_RATIO = 64.0
GOAL_GROWTH = 0.10  # out-of-core peak RSS from the first depth to GROWTH_DEPTH
GROWTH_DEPTH = 512


# -- the training modes compared -------------------------------------------------------------


def modes() -> dict[str, dict[str, Any]]:
    """Mode label -> ``training`` settings of the trial (an out-of-core rack is built on the
    meta device: shapes only; the trainer draws each block when its stage starts)."""
    return {
        "rackwise": {"training": {"training_architecture": "rackwise"}},
        "blockwise": {"training": {"training_architecture": "blockwise"}},
        "blockwise_out_of_core": {
            "training": {"training_architecture": "blockwise", "out_of_core": True}
        },
    }


# -- memory caps -----------------------------------------------------------------------------


class CgroupCap:
    """A memory cgroup below this process's own, limited to `limit` bytes (swap included)."""

    def __init__(self, parent: Path, version: int, limit: int) -> None:
        self.version = version
        self.path = parent / f"stackwise-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        try:
            if version == 1:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                swap = self.path / "memory.memsw.limit_in_bytes"
                if swap.exists():  # memory + swap: the trial cannot escape into swap
                    swap.write_text(str(limit))
            else:
                (self.path / "memory.max").write_text(str(limit))
                swap = self.path / "memory.swap.max"
                if swap.exists():
                    swap.write_text("0")
        except OSError:
            self.remove()
            raise

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        with contextlib.suppress(OSError, ValueError):
            return int((self.path / name).read_text())
        return None

    def oom_kills(self) -> int | None:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return None

    def remove(self) -> None:
        for _ in range(50):  # the killed trial may take a moment to leave the group
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def own_cgroup() -> tuple[Path, int] | None:
    """This process's memory cgroup folder and cgroup version, if a child group can be made
    there (writable, memory controller available to children); None otherwise."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (folder / "memory.limit_in_bytes").exists() and os.access(folder, os.W_OK):
                return folder, 1
    for line in lines:
        if line.startswith("0::"):
            folder = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            control = folder / "cgroup.subtree_control"
            with contextlib.suppress(OSError):
                if "memory" in control.read_text().split() and os.access(folder, os.W_OK):
                    return folder, 2
    return None


def usable_cgroup(limit: int) -> tuple[Path, int] | None:
    """`own_cgroup` if a capped child group can actually be created there."""
    found = own_cgroup()
    if found is None:
        return None
    try:
        CgroupCap(found[0], found[1], limit).remove()
    except OSError:
        return None
    return found


@contextlib.contextmanager
def capped(cgroup: tuple[Path, int] | None, limit: int) -> Iterator[CgroupCap | None]:
    if cgroup is None:
        yield None
        return
    cap = CgroupCap(cgroup[0], cgroup[1], limit)
    try:
        yield cap
    finally:
        cap.remove()


# -- one trial (child process) ---------------------------------------------------------------

MAX_STACK_BLOCKS = 1024


def stacks_of(depth: int) -> int:
    """Stacks of a rack of `depth` blocks: as few as hold it, of equal size."""
    stacks = -(-depth // MAX_STACK_BLOCKS)
    while depth % stacks:
        stacks += 1
    return stacks


def child(args: argparse.Namespace) -> None:
    """Join the cgroup (before anything big is loaded), train, print one JSON line."""
    if args.cgroup:
        Path(args.cgroup, "cgroup.procs").write_text(str(os.getpid()))
    import torch

    import stackwise
    from stackwise.api import build_rack
    from stackwise.config.base import StackWiseConfig
    from stackwise.training.metrics import peak_rss_bytes

    torch.set_num_threads(args.threads)
    mode = modes()[args.child]
    training = mode["training"]
    stages = 1 if training["training_architecture"] == "rackwise" else args.depth
    steps = args.steps_per_stage * stages
    config = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": args.d_model,
                "n_heads": max(1, args.d_model // 64),
                "attention_mode": "causal",
                # A stack holds at most 1,024 blocks: deeper racks are several equal stacks.
                "architecture": {
                    "n_stacks": stacks_of(args.depth),
                    "blocks_per_stack": args.depth // stacks_of(args.depth),
                },
            },
            "training": {
                **training,
                "objective": "clm",
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "budget": {"steps": steps},
                "device": "cpu",
                "log_every_steps": 1000,
            },
        }
    )
    start = time.perf_counter()
    rack = build_rack(config)  # out of core: on the meta device
    parameters = rack.get_parameter_count()
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len)
    batches = [torch.randint(0, 256, shape, generator=generator) for _ in range(steps)]
    results = stackwise.train(config, batches=batches, rack=rack).results
    print(
        json.dumps(
            {
                "parameters": parameters,
                "peak_rss_bytes": peak_rss_bytes(),
                "steps": results.total_steps,
                "final_train_loss": results.final_train_loss,
                "seconds": time.perf_counter() - start,
            }
        )
    )


def trial(
    mode: str, depth: int, args: argparse.Namespace, cgroup: tuple[Path, int] | None
) -> dict[str, Any]:
    limit = args.cap_mb * 2**20
    with capped(cgroup, limit) as cap:
        command = [sys.executable, __file__, "--child", mode, "--depth", str(depth)]
        for name in ("d_model", "seq_len", "batch_size", "steps_per_stage", "threads"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        if cap is not None:
            command += ["--cgroup", str(cap.path)]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-capacity-") as scratch:
            # the trial's temporary files (out-of-core pieces, a spilled cache) go here
            env = {**os.environ, "TMPDIR": scratch}
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.timeout, env=env
                )
                returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
            except subprocess.TimeoutExpired:
                returncode, stdout, stderr = None, "", f"timed out after {args.timeout:.0f} s"
        outcome: dict[str, Any] = {"depth": depth, "returncode": returncode}
        outcome["seconds"] = time.perf_counter() - start
        if cap is not None:
            outcome["cgroup_peak_bytes"] = cap.peak_bytes()
            outcome["oom_kills"] = cap.oom_kills()
    lines = stdout.strip().splitlines()
    if returncode == 0 and lines:
        outcome.update(json.loads(lines[-1]))
        outcome["fits"] = cap is not None or outcome["peak_rss_bytes"] <= limit
        outcome["failure"] = None if outcome["fits"] else "memory"
    else:
        outcome["fits"] = False
        outcome["error"] = (stderr.strip().splitlines() or ["killed"])[-1][-300:]
        outcome["failure"] = failure_kind(returncode, outcome.get("oom_kills"), stderr)
    return outcome


def failure_kind(returncode: int | None, oom_kills: int | None, stderr: str) -> str:
    """Why a trial did not train: ``memory`` (killed by the cap, or out of memory), ``time``
    (past --timeout) or ``error`` (anything else, such as a full disk: not a capacity limit)."""
    if returncode is None:
        return "time"
    if oom_kills or returncode in (-9, 137) or "MemoryError" in stderr:
        return "memory"
    if "out of memory" in stderr.lower() or "Cannot allocate memory" in stderr:
        return "memory"
    return "error"


def largest(mode: str, args: argparse.Namespace, cgroup: tuple[Path, int] | None) -> dict:
    """Double the depth until a trial fails (or --max-depth); the last one that fit."""
    trials = []
    depth = args.start_depth
    while depth <= args.max_depth:
        outcome = trial(mode, depth, args, cgroup)
        trials.append(outcome)
        print(f"{mode} depth {depth}: {'fits' if outcome['fits'] else 'does not fit'}", flush=True)
        if not outcome["fits"]:
            break
        depth *= 2
    fitting = [t for t in trials if t["fits"]]
    best = fitting[-1] if fitting else None
    return {
        "largest_depth": best["depth"] if best else None,
        "largest_parameters": best["parameters"] if best else None,
        "first_failing_depth": None if trials[-1]["fits"] else trials[-1]["depth"],
        "failure": trials[-1]["failure"],
        "stopped_at_max_depth": bool(trials[-1]["fits"]),
        "trials": trials,
    }


def peaks_by_depth(result: dict[str, Any]) -> dict[int, float]:
    """Peak RSS (MiB) of each trial that fit, by depth."""
    return {t["depth"]: t["peak_rss_bytes"] / 2**20 for t in result["trials"] if t["fits"]}


def growth_row(result: dict[str, Any], start: int, args: argparse.Namespace) -> dict[str, Any]:
    """Headline: how out-of-core blockwise's peak RSS moves from the first depth to
    `GROWTH_DEPTH` blocks (and to the deepest trial that fit)."""
    peaks = peaks_by_depth(result)
    what = (
        f"Out-of-core blockwise peak RSS vs depth, d_model {args.d_model}, seq {args.seq_len}, "
        f"batch {args.batch_size}, {args.steps_per_stage} step per stage (fresh process per depth)"
    )
    goal = f"<= +{GOAL_GROWTH:.0%} from {start} to {GROWTH_DEPTH} blocks"
    if start not in peaks or GROWTH_DEPTH not in peaks:
        return headline(what, "not measured to that depth", goal, None, "")
    growth = peaks[GROWTH_DEPTH] / peaks[start] - 1
    deepest = max(peaks)
    figure = (
        f"{start} -> {GROWTH_DEPTH} blocks: {peaks[start]:.0f} -> {peaks[GROWTH_DEPTH]:.0f} MiB, "
        f"**{growth:+.1%}**"
    )
    if deepest > GROWTH_DEPTH:
        figure += f"; {deepest} blocks: {peaks[deepest]:.0f} MiB ({peaks[deepest] / peaks[start] - 1:+.1%})"
    met = growth <= GOAL_GROWTH
    note = (
        ""
        if met
        else "the meta rack's Python objects (its modules, about 45 KB per block, and a second "
        "meta rack while the cache allowance is estimated) and the heap around them grow with "
        "depth; peak RSS of every trial in the JSON"
    )
    return headline(what, figure, goal, met, note)


def plot(results: dict[str, Any], cap_mb: int, path: Path) -> None:
    """Peak RSS against depth, one line per mode, with the cap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for mode, result in results.items():
        peaks = peaks_by_depth(result)
        if peaks:
            axes.plot(list(peaks), list(peaks.values()), marker="o", label=mode)
        failed = result["first_failing_depth"]
        if failed is not None:
            axes.scatter([failed], [cap_mb], marker="x", color="black", zorder=3)
    axes.axhline(cap_mb, color="grey", linestyle="--", label=f"cap {cap_mb} MiB")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("blocks (x: first depth that did not fit)")
    axes.set_ylabel("peak RSS (MiB)")
    axes.set_title("Capacity: peak memory of training vs depth")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-mb", type=int, default=768, help="memory cap of a trial (MiB)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps-per-stage", type=int, default=1)
    parser.add_argument("--start-depth", type=int, default=4)
    parser.add_argument("--max-depth", type=int, default=4096, help="the stated depth limit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per trial")
    parser.add_argument("--method", choices=("auto", "cgroup", "rss"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny rack, depth 1 only")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cgroup", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    if args.quick:
        args.d_model, args.seq_len, args.batch_size = 32, 16, 2
        args.start_depth, args.max_depth = 1, 1
    limit = args.cap_mb * 2**20
    cgroup = None if args.method == "rss" else usable_cgroup(limit)
    if args.method == "cgroup" and cgroup is None:
        raise SystemExit("bench_capacity: no memory cgroup can be created here; use --method rss")
    method = "cgroup" if cgroup is not None else "rss"
    results = {mode: largest(mode, args, cgroup) for mode in modes()}
    rack_params = results["rackwise"]["largest_parameters"]
    depthwise = [m for m in results if m != "rackwise"]
    ratios = {
        mode: (results[mode]["largest_parameters"] or 0) / rack_params if rack_params else None
        for mode in depthwise
    }
    best_ratio = max((r for r in ratios.values() if r is not None), default=None)
    met = None if best_ratio is None else best_ratio >= GOAL_RATIO
    at_least = {m: "≥ " if results[m]["stopped_at_max_depth"] else "" for m in results}
    figure = "; ".join(
        f"{mode}: nothing fits"
        if r["largest_depth"] is None
        else f"{mode}: {at_least[mode]}{r['largest_depth']} blocks "
        f"({r['largest_parameters'] / 1e6:.1f} M parameters"
        + (f", **{ratios[mode]:.1f}x** rackwise" if ratios.get(mode) else "")
        + ")"
        for mode, r in results.items()
    )
    note = ""
    if met is False:
        note = (
            "blockwise keeps every block's weights in memory (4 bytes per parameter against "
            "rackwise's weights, gradients and two AdamW moments, 16 bytes, plus activations), "
            "so it reaches about 4x; out-of-core blockwise stops where its memory, which "
            "still grows with depth (next row), meets the cap"
        )
    deepest = results["blockwise_out_of_core"]
    for mode, result in results.items():
        if result["failure"] not in (None, "memory"):
            failed = result["trials"][-1]
            note += (
                f"{'; ' if note else ''}{mode} stopped at {failed['depth']} blocks on "
                f"{'its time limit' if result['failure'] == 'time' else 'an error'}, not "
                f"memory ({failed['error']}): its largest depth is a lower bound"
            )
    if deepest["stopped_at_max_depth"]:
        note += (
            f"{'; ' if note else ''}out-of-core blockwise still fit at the stated depth limit "
            f"(--max-depth {args.max_depth}): its ratio is where the trial stopped, not a failure"
        )
    result = {
        "benchmark": "bench_capacity",
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "depth", "cgroup")},
        "cap_bytes": limit,
        "method": method,
        "cgroup_version": None if cgroup is None else cgroup[1],
        "modes": list(results),
        "results": results,
        "peak_rss_mib_by_depth": {mode: peaks_by_depth(r) for mode, r in results.items()},
        "parameter_ratio_over_rackwise": ratios,
        "goal": f"largest depth-wise rack >= {GOAL_RATIO:g}x the parameters of the largest rackwise",
        "goal_met": met,
        "headline": [
            headline(
                f"Capacity under a {args.cap_mb} MiB memory cap ({method}; whole process), "
                f"d_model {args.d_model}, seq {args.seq_len}, batch {args.batch_size}: largest "
                f"rack (depth doubling from {args.start_depth}, to at most {args.max_depth}) "
                "that trains",
                figure,
                f">= {GOAL_RATIO:g}x rackwise's parameters",
                met,
                note,
            ),
            growth_row(deepest, args.start_depth, args),
        ],
    }
    png = Path(args.out).with_suffix(".png") if args.out else None
    if png is None:
        png = (RESULTS / "quick" if args.quick else RESULTS) / "bench_capacity.png"
    plot(results, args.cap_mb, png)
    publish("bench_capacity", result, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
