"""Test sessions: `nox -s tests`, `nox -s lint`, `nox -s typecheck`; `nox -s distributed` (run
by CI after them) runs grids on the real engines (--jobs, Ray, torchrun over gloo); `nox -s bench`
(not run by default) measures the CPU benchmark set and rewrites the README's benchmark table.

torch is installed as its CPU build unless STACKWISE_TORCH names another requirement
(e.g. STACKWISE_TORCH=torch for the default CUDA wheel on a GPU machine).
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("STACKWISE_TORCH", "torch==2.13.0")


def _install_project(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (skips `slow` tests unless arguments say otherwise)."""
    _install_project(session, "test")
    args = session.posargs or ["-m", "not slow", "-n", "2"]
    session.run("pytest", *args, env={"MLFLOW_TRACKING_URI": ""})


@nox.session
def distributed(session: nox.Session) -> None:
    """Grids on the real engines: --jobs, a local Ray cluster, torchrun with 2 CPU processes
    (gloo). Ray is installed here, so a missing Ray fails instead of skipping."""
    _install_project(session, "test,ray")
    args = session.posargs or ["-m", "distributed", "tests/test_executors.py"]
    session.run("pytest", *args, env={"MLFLOW_TRACKING_URI": "", "STACKWISE_REQUIRE_RAY": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    _install_project(session, "dev")
    session.run("mypy", "stackwise")


# The CPU benchmark set, in full mode (about 10 minutes on 2 cores). Each writes its JSON to
# benchmarks/results/; report.py then rewrites the README's table from them. The GPU set is
# `bash benchmarks/gpu.sh` on a CUDA machine (not a nox session: it needs the machine's CUDA
# torch); its *_cuda.json results join the same table.
BENCHMARKS = (
    "bench_vs_llama.py",
    "bench_mfu.py",
    "bench_memory.py",
    "bench_capacity.py",
    "bench_depth.py",
    "bench_attention.py",
    "bench_favor.py",
    "bench_logging_overhead.py",
    "bench_quantization.py",
    "bench_startup.py",
)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the CPU benchmarks (full mode) and regenerate the README table from their JSON.

    `nox -s bench --no-venv` runs them in the current environment (which needs the bench extra).
    """
    if session.venv_backend != "none":
        _install_project(session, "bench")
    for script in BENCHMARKS:
        session.run("python", f"benchmarks/{script}", *session.posargs)
    session.run("python", "benchmarks/report.py")
