"""Where every benchmark's result goes: printed as JSON and written to benchmarks/results/.

Every result gets a ``run`` section saying where and how it was measured: machine (CPU model,
cores), torch version, UTC date, load average when the script started, and the command. A
``--quick`` run (tiny shapes, seconds; what the tests run) is marked ``"quick": true`` and goes to
``results/quick/`` unless told otherwise, so it never replaces a full result. A result measured on
another device than the CPU (``--device cuda``) says so in ``device``, names the GPU as its machine
and is written as ``<name>_cuda.json``, beside the CPU result. Scripts that state a goal add
``headline`` rows (what, figure, goal, met, note), which `report.py` turns into the README's
benchmark table.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what `platform` knows."""
    with contextlib.suppress(OSError):  # no /proc (macOS): fall back to platform
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_model() -> str:
    """The CUDA device's name and the CUDA version torch was built with."""
    import torch

    return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"


def run_info(device: str = "cpu") -> dict[str, Any]:
    """Machine, versions, date, load and command of this process; on a GPU the machine is the
    GPU, with its host CPU."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):  # a script outside the working folder: as given
        script = script.resolve().relative_to(Path.cwd())
    machine = f"{cpu_model()}, {cores} cores ({platform.machine()})"
    if device != "cpu":
        machine = f"{gpu_model()}, host {machine}"
    return {
        "machine": machine,
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": None if _LOAD_AT_START is None else list(_LOAD_AT_START),
        "command": shlex.join(["python", str(script), *sys.argv[1:]]),
    }


def headline(
    what: str, figure: str, goal: str | None, met: bool | None, note: str = ""
) -> dict[str, Any]:
    """One row of the README table: what was measured, the figure, the goal, whether it is met,
    and (where missed) what stands in the way."""
    return {"what": what, "figure": figure, "goal": goal, "met": met, "note": note}


def result_name(name: str, device: str = "cpu") -> str:
    """The results file's stem: `name` on the CPU, ``<name>_cuda`` on CUDA."""
    return name if device == "cpu" else f"{name}_{device}"


def publish(
    name: str,
    result: dict[str, Any],
    out: str | Path | None = None,
    quick: bool = False,
    device: str = "cpu",
) -> Path:
    """Print `result` as JSON and write it to `out` (default: ``results/<name>.json``, or
    ``results/quick/<name>.json`` for a quick run; ``<name>_cuda.json`` for a CUDA run)."""
    result = {**result, "device": device, "quick": quick, "run": run_info(device)}
    text = json.dumps(result, indent=2)
    print(text)
    if out is None:
        out = (RESULTS / "quick" if quick else RESULTS) / f"{result_name(name, device)}.json"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path
