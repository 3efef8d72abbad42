"""The benchmark scripts in their --quick mode (real subprocesses, tiny shapes), the GPU set's
script (benchmarks/gpu.sh) on a machine without CUDA, and the README table generator
(benchmarks/report.py) on temporary files."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from stackwise.config.base import TrainingConfig
from stackwise.config.blocks import default_d_ff

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
GPU_SCRIPT = BENCHMARKS / "gpu.sh"
HEADLINE_KEYS = {"what", "figure", "goal", "met", "note"}
RUN_KEYS = {"machine", "device", "torch", "date", "command", "load_average_at_start"}
GPU_NOT_RUN = "GPU: not run (no GPU on the machine that produced this table)"


def without_cuda(**extra: str) -> dict[str, str]:
    """This environment with every CUDA device hidden (so the test holds on a GPU machine too)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", **extra}


def run_quick(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--quick", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == script
    assert data["quick"] is True
    assert set(data["run"]) >= RUN_KEYS
    assert f"benchmarks/{script}.py --quick" in data["run"]["command"]
    # Unless told otherwise a benchmark runs on the CPU and says so.
    expected_device = extra[extra.index("--device") + 1] if "--device" in extra else "cpu"
    assert data["device"] == data["run"]["device"] == expected_device
    assert data["headline"], "a benchmark with a goal reports a headline row"
    for row in data["headline"]:
        assert set(row) == HEADLINE_KEYS
    return data


def test_vs_llama_quick(tmp_path: Path) -> None:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs the bench extra (transformers)")
    data = run_quick("bench_vs_llama", tmp_path, "--device", "cpu")
    assert data["config"]["precision"] == "fp32" and not data["config"]["tf32"]
    (shape,) = data["shapes"].values()
    # Same architecture, so the same parameter count; both models really trained.
    assert shape["parameters"]["stackwise"] == shape["parameters"]["llama"]
    assert set(shape["steps_per_s"]) == {"stackwise", "llama"}
    assert all(t > 0 for t in shape["median_step_s"].values())
    ratio = shape["steps_per_s"]["stackwise"] / shape["steps_per_s"]["llama"]
    assert math.isclose(data["speed_ratio"]["32x2"], ratio)
    # The ceiling: Llama's step over its time in the kernels both run alike.
    assert 0 < shape["llama_shared_kernel_share"] < 1
    assert math.isclose(shape["speed_ratio_ceiling"], 1 / shape["llama_shared_kernel_share"])
    assert data["goal"] == "speed_ratio >= 1.25 at every shape"


def test_mfu_quick(tmp_path: Path) -> None:
    data = run_quick("bench_mfu", tmp_path, "--device", "cpu")
    peak = data["peak"]
    # On the CPU there is no datasheet: MFU is against the measured peak, as it always was.
    assert peak["datasheet"] is None and peak["flops_per_s"] == peak["measured_flops_per_s"]
    assert data["profile"]["time_measured"] == "CPU operator self time"
    size = peak["before"]["size"]
    assert math.isclose(
        peak["before"]["flops_per_s"], 2 * size**3 / peak["before"]["best_seconds"], rel_tol=1e-9
    )
    assert peak["flops_per_s"] == max(peak["before"]["flops_per_s"], peak["after"]["flops_per_s"])
    for mode in ("rackwise", "blockwise"):
        run = data["runs"][mode]
        expected = run["flops"] / run["train_seconds"] / peak["flops_per_s"]
        assert math.isclose(run["mfu"], expected, rel_tol=1e-9)
        assert run["mfu_vs_measured_peak"] == run["mfu"]
        assert run["mfu"] > 0
    fractions = data["profile"]["fractions"]
    assert "matmul" in fractions and "optimizer (adamw)" in fractions
    assert math.isclose(sum(fractions.values()), 1.0, rel_tol=1e-6)
    assert fractions["matmul"] > 0 and fractions["optimizer (adamw)"] > 0
    # The trainer's AdamW on the CPU is PyTorch's fused kernel, and its row says so.
    optimizer = data["optimizer_step_seconds"]
    assert optimizer["configured_is_fused"] is True
    assert all(optimizer[k] > 0 for k in ("as_configured", "loop", "foreach", "fused"))
    (row,) = [r for r in data["headline"] if r["what"].startswith("AdamW step")]
    assert row["met"] is True and row["figure"].startswith("fused: ")


def test_memory_quick(tmp_path: Path) -> None:
    data = run_quick("bench_memory", tmp_path, "--device", "cpu")
    assert data["figure_key"] == "peak_rss_delta_bytes"
    runs = data["runs"]
    assert set(runs) == {"rackwise", "stackwise", "blockwise"}
    # Each mode trains the same rack for its stages: 1, 3 (stacks) and 12 (blocks) x 2 steps.
    assert {m: r["steps"] for m, r in runs.items()} == {
        "rackwise": 2,
        "stackwise": 6,
        "blockwise": 24,
    }
    assert len({r["parameters"] for r in runs.values()}) <= 2  # untied head: + one embedding
    assert all(r["peak_rss_delta_bytes"] > 0 for r in runs.values())
    # The blockwise pool (2 micro-batches of 2 x 64 x 64 fp32) is cached.
    assert runs["blockwise"]["cache_bytes"] == 2 * 2 * 64 * 64 * 4
    assert math.isclose(
        data["blockwise_over_rackwise"],
        runs["blockwise"]["peak_rss_delta_bytes"] / runs["rackwise"]["peak_rss_delta_bytes"],
    )


def test_capacity_quick(tmp_path: Path) -> None:
    data = run_quick("bench_capacity", tmp_path)
    expected_modes = ["rackwise", "blockwise"]
    if "out_of_core" in TrainingConfig.model_fields:
        expected_modes.append("blockwise_out_of_core")
    assert data["modes"] == expected_modes
    # Hand count at d_model 32, one block, vocabulary 260, tied head: embedding 260*32,
    # qkv 32*96, o 32*32, SwiGLU 3*32*88 (d_ff 88), two block norms and the final norm.
    hand_count = 260 * 32 + 32 * 96 + 32 * 32 + 3 * 32 * 88 + 3 * 32
    for mode in expected_modes:
        result = data["results"][mode]
        (trial,) = result["trials"]
        assert trial["fits"] and trial["depth"] == 1
        assert result["largest_depth"] == 1 and result["stopped_at_max_depth"]
        assert result["largest_parameters"] == hand_count


def test_capacity_cap_stops_a_rack_that_does_not_fit(tmp_path: Path) -> None:
    # 64 MiB is below what Python with torch needs at all: no trial may be reported as fitting.
    data = run_quick("bench_capacity", tmp_path, "--cap-mb", "64")
    for result in data["results"].values():
        (trial,) = result["trials"]
        assert not trial["fits"]
        assert result["largest_depth"] is None and result["first_failing_depth"] == 1
    if data["method"] == "cgroup":
        assert all(r["trials"][0]["returncode"] != 0 for r in data["results"].values())
    assert all(r["failure"] == "memory" for r in data["results"].values())


def test_a_capacity_trial_that_fails_on_anything_but_memory_is_not_a_capacity_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its helper modules, as when run as a script
    bench = _load_benchmark_module("bench_capacity")
    assert bench.failure_kind(-9, 0, "") == "memory"  # killed by the cap
    assert bench.failure_kind(1, 1, "") == "memory"  # the cgroup counted an OOM kill
    assert bench.failure_kind(1, 0, "MemoryError") == "memory"
    assert bench.failure_kind(None, None, "") == "time"
    full_disk = "SafetensorError: I/O error: No space left on device (os error 28)"
    assert bench.failure_kind(1, 0, full_disk) == "error"


def test_depth_quick(tmp_path: Path) -> None:
    data = run_quick("bench_depth", tmp_path)
    times = data["wall_time_s"]
    assert set(times) == {"cached", "uncached"}
    assert all(set(t) == {"1", "2", "4"} for t in times.values())
    assert math.isclose(
        data["time16_over_time8"]["cached"], times["cached"]["4"] / times["cached"]["2"]
    )
    assert data["goal_met"] == (times["cached"]["4"] / times["cached"]["2"] <= 2.2)


def test_attention_quick(tmp_path: Path) -> None:
    data = run_quick("bench_attention", tmp_path)
    points = data["points"]
    assert set(points) == {"mha", "gqa", "mla", "kernel_elu", "kernel_favor"}
    d_model = data["settings"]["d_model"]
    for kind, by_length in points.items():
        assert set(by_length) == {"64", "128"}, kind
        for length, point in by_length.items():
            assert point["seconds"] > 0
            # At least the output and its gradient, [1, T, d_model] fp32 each, are allocated.
            assert point["peak_bytes"] >= 2 * int(length) * d_model * 4, (kind, length)
    elu = points["kernel_elu"]
    assert math.isclose(
        data["time_ratio_long_over_quarter"]["kernel_elu"],
        elu["128"]["seconds"] / elu["64"]["seconds"],
    )


def test_logging_overhead_quick(tmp_path: Path) -> None:
    data = run_quick("bench_logging_overhead", tmp_path)
    assert data["train_loss_points_logged"] == 20 // 5  # 20 steps, logged every 5
    assert 0 < data["hook_time_fraction"] < 1
    assert len(data["plain_wall_s"]) == len(data["logged_wall_s"]) == 1


@pytest.mark.slow
def test_startup_quick(tmp_path: Path) -> None:
    data = run_quick("bench_startup", tmp_path)
    assert set(data["seconds"]) == {"help", "validate", "plan", "compare"}
    for timing in data["seconds"].values():
        assert timing["ratio"] == pytest.approx(timing["command_s"] / timing["reference_s"])


@pytest.mark.slow
def test_data_quick(tmp_path: Path) -> None:
    """Prepare against the plain encode loop, the loader against a training step and the
    peak memory of training on two corpus sizes, each figure its parts' ratio."""
    data = run_quick("bench_data", tmp_path)
    for row in data["prepare"].values():
        assert row["ratio"] == pytest.approx(row["reference_s"] / row["prepare_s"])
    assert data["memory"]["large"]["corpus_mb"] > data["memory"]["small"]["corpus_mb"]
    assert all(side["steps"] == 3 for side in data["memory"].values())
    ratio = data["memory"]["large"]["peak_rss_mb"] / data["memory"]["small"]["peak_rss_mb"]
    assert data["memory_ratio"] == pytest.approx(ratio)
    loader = data["loader"]
    assert loader["ratio"] == pytest.approx(
        loader["loader_tokens_per_s"] / loader["training_tokens_per_s"]
    )


@pytest.mark.slow
def test_quickstart_quick(tmp_path: Path) -> None:
    """The quickstart grid through the real CLI into a temporary store: its three runs, read
    back with `stackwise compare`, and the wall time of the whole command around them."""
    data = run_quick("bench_quickstart", tmp_path, "--device", "cpu")
    runs = data["runs"]
    assert set(runs) == {"layerwise", "stackwise", "rackwise"}
    assert all(
        run["status"] == "FINISHED" and math.isfinite(run["val_loss"]) for run in runs.values()
    )
    assert data["settings"]["overrides"][0] == "training.device=cpu"
    assert data["runs_wall_seconds"] == pytest.approx(sum(r["wall_time_s"] for r in runs.values()))
    assert data["wall_seconds"] > data["runs_wall_seconds"] > 0
    assert f"**{data['wall_seconds']:.0f} s**" in data["headline"][0]["figure"]


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("bench_mfu", ["--device", "cuda"], "--device cuda: no CUDA device here"),
        ("bench_memory", ["--device", "cuda"], "--device cuda: no CUDA device here"),
        ("bench_vs_llama", ["--precision", "bf16"], "--precision bf16 needs --device cuda"),
    ],
)
def test_a_device_this_machine_cannot_run_is_a_one_line_error(
    tmp_path: Path, script: str, args: list[str], message: str
) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--quick", "--out", str(out), *args],
        cwd=ROOT,
        env=without_cuda(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{script}.py: error: ") and message in line
    assert not out.exists()


def _load_benchmark_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("device", "file_name"), [("cpu", "bench_x.json"), ("cuda", "bench_x_cuda.json")]
)
def test_a_result_is_written_under_its_device_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, file_name: str
) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    report = _load_benchmark_module("_report")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    path = report.publish("bench_x", {"benchmark": "bench_x"}, device=device)
    assert path == tmp_path / file_name
    data = json.loads(path.read_text())
    assert data["device"] == data["run"]["device"] == device
    if device == "cuda":
        assert data["run"]["machine"].startswith(torch.cuda.get_device_name())


# -- the GPU set ----------------------------------------------------------------------------


def test_gpu_script_without_cuda_stops_at_once_with_status_2(tmp_path: Path) -> None:
    """On a machine where torch sees no CUDA device, gpu.sh says so in one line and exits 2
    before any benchmark starts (it would otherwise make a log folder under TMPDIR first)."""
    assert os.access(GPU_SCRIPT, os.X_OK), "benchmarks/gpu.sh is executable"
    start = time.monotonic()
    done = subprocess.run(
        [str(GPU_SCRIPT)],
        cwd=tmp_path,  # it finds the repository from its own path
        env=without_cuda(PYTHON=sys.executable, TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("gpu.sh: no CUDA device: torch.cuda.is_available() is false")
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 30


def test_gpu_script_is_valid_shell() -> None:
    done = subprocess.run(["bash", "-n", str(GPU_SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", str(GPU_SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.slow
def test_load_quick(tmp_path: Path) -> None:
    data = run_quick("bench_load", tmp_path)
    for store in data["stores"].values():
        assert store["finished"] == 8 and store["points_with_several_runs"] == 0
        assert store["repeated_metric_steps"] == 0 and store["lock_errors_shown"] == 0


# -- the README table -------------------------------------------------------------------------


def _result(
    name: str, rows: list[dict[str, Any]], quick: bool = False, device: str | None = None
) -> dict[str, Any]:
    """A result as `publish` writes it (`device` None: as written before devices were
    recorded)."""
    machine = "Test CPU, 2 cores (x86_64)"
    if device == "cuda":
        machine = f"Test GPU (CUDA 12.4), host {machine}"
    return {
        "benchmark": name,
        "quick": quick,
        "headline": rows,
        **({} if device is None else {"device": device}),
        "run": {
            "machine": machine,
            "torch": "2.0",
            "date": "2030-01-02 03:04 UTC",
            "load_average_at_start": [0.25, 0.5, 0.5],
            "command": f"python benchmarks/{name}.py",
        },
    }


def _row(what: str, figure: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"what": what, "figure": figure, "goal": ">= 1", "met": met, "note": note}


def _report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "report.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_report_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_depth.json").write_text(
        json.dumps(_result("bench_depth", [_row("Depth", "2.06", True)]))
    )
    (results / "bench_vs_llama.json").write_text(
        json.dumps(
            _result(
                "bench_vs_llama",
                [_row("Speed a", "1.1x", True), _row("Speed b", "0.9x", False, "a | b")],
            )
        )
    )
    quick = _result("bench_mfu", [_row("Quick only", "9", True)], quick=True)
    (results / "bench_mfu.json").write_text(json.dumps(quick))
    (results / "bench_cache_spill.json").write_text(json.dumps({"benchmark": "x"}))
    before, after = "# Title\n\nIntro text.\n", "\nAfter the table.\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + "<!-- bench:start -->\nold table\n<!-- bench:end -->" + after)

    done = _report("--results", str(results), "--readme", str(readme))
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith(before + "<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->" + after)
    assert "old table" not in text and "Quick only" not in text
    body = text[text.index("<!-- bench:start -->") : text.index("<!-- bench:end -->")]
    rows = [line for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    header, *table = rows
    assert header.startswith("| What |")
    # Llama rows first (the README's order), then depth; a missed goal carries its note, with
    # the pipe escaped so the table keeps its columns. No GPU result: one row says so.
    assert [r.split(" | ")[0] for r in table] == [
        "| Speed a",
        "| Speed b",
        "| Depth",
        f"| {GPU_NOT_RUN}",
    ]
    assert table[1].split(" | ")[3] == "**no**: a \\| b"
    assert table[0].split(" | ")[3] == "yes"
    assert "`python benchmarks/bench_vs_llama.py`" in table[0]
    assert "Test CPU, 2 cores (x86_64), torch 2.0; 2030-01-02 03:04 UTC; load 0.2" in table[0]
    assert all(r.count(" | ") == 5 for r in table)

    # Rewriting again changes nothing, and --check agrees; a stale table fails --check.
    assert _report("--results", str(results), "--readme", str(readme)).returncode == 0
    assert readme.read_text() == text
    assert _report("--results", str(results), "--readme", str(readme), "--check").returncode == 0
    readme.write_text(text.replace("Speed a", "Speed z"))
    assert _report("--results", str(results), "--readme", str(readme), "--check").returncode == 1


def _table_rows(readme: Path) -> list[list[str]]:
    """The generated table's rows (the header left out), split into cells."""
    text = readme.read_text()
    body = text[text.index("<!-- bench:start -->") : text.index("<!-- bench:end -->")]
    rows = [line for line in body.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_report_gpu_rows_follow_the_cpu_rows_when_cuda_results_exist(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("# T\n<!-- bench:start -->\n<!-- bench:end -->\n")
    (results / "bench_mfu.json").write_text(
        json.dumps(_result("bench_mfu", [_row("MFU cpu", "0.67", False, "slow")]))
    )
    # A quick GPU result is never shown, so the GPU set still counts as not run.
    (results / "quick").mkdir()
    quick = _result("bench_mfu", [_row("MFU gpu quick", "0.1", None)], quick=True, device="cuda")
    (results / "bench_mfu_cuda.json").write_text(json.dumps(quick))
    assert _report("--results", str(results), "--readme", str(readme)).returncode == 0
    rows = _table_rows(readme)
    assert [r[0] for r in rows] == ["MFU cpu", GPU_NOT_RUN]
    assert rows[1][1:] == ["—", "—", "n/a", "`bash benchmarks/gpu.sh`", "—"]

    # Hand-made GPU results (as gpu.sh writes them): their rows come after every CPU row, in
    # the README's order, name the GPU, and the "not run" row is gone.
    (results / "bench_mfu_cuda.json").write_text(
        json.dumps(_result("bench_mfu", [_row("MFU gpu", "0.45", None)], device="cuda"))
    )
    (results / "bench_vs_llama_cuda.json").write_text(
        json.dumps(_result("bench_vs_llama", [_row("Speed gpu", "1.2x", True)], device="cuda"))
    )
    (results / "bench_depth.json").write_text(
        json.dumps(_result("bench_depth", [_row("Depth", "2.06", True)]))
    )
    assert _report("--results", str(results), "--readme", str(readme)).returncode == 0
    rows = _table_rows(readme)
    assert [r[0] for r in rows] == ["MFU cpu", "Depth", "Speed gpu", "MFU gpu"]
    assert rows[2][3] == "yes" and rows[3][3] == "n/a"
    assert rows[2][5].startswith("Test GPU (CUDA 12.4), host Test CPU")
    assert rows[0][5].startswith("Test CPU")
    assert GPU_NOT_RUN not in readme.read_text()


def test_report_without_markers_is_a_clear_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nno markers here\n")
    done = _report("--results", str(tmp_path), "--readme", str(readme))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "bench:start" in done.stderr
    assert readme.read_text() == "# Title\n\nno markers here\n"


def test_quantization_quick(tmp_path: Path) -> None:
    data = run_quick("bench_quantization", tmp_path)
    rows = data["results"]
    assert set(rows) == {"fp32", "bf16", "int8"}
    assert rows["fp32"]["loss_minus_fp32"] == 0.0
    for row in rows.values():
        assert math.isclose(
            row["loss_minus_fp32"], row["final_val_loss"] - rows["fp32"]["final_val_loss"]
        )
    # the trunk's linear weights, counted by hand: the quick rack (d_model 32, 2 blocks, default
    # heads and FFN width) holds one block's qkv (96 x 32), o (32 x 32), gate and up (d_ff x 32)
    # and down (32 x d_ff) in the last stage: 4, 2 and 1 bytes each, int8 with a 4-byte scale
    # per output row
    d_ff = default_d_ff(32)
    shapes = [(96, 32), (32, 32), (d_ff, 32), (d_ff, 32), (32, d_ff)]
    weights = sum(rows_ * cols for rows_, cols in shapes)
    assert rows["fp32"]["trunk_linear_bytes"] == 4 * weights
    assert rows["bf16"]["trunk_linear_bytes"] == 2 * weights
    assert rows["int8"]["trunk_linear_bytes"] == weights + 4 * sum(r for r, _ in shapes)
    assert data["faster_low_memory_precision"] in ("int8", "bf16")


def test_favor_quick(tmp_path: Path) -> None:
    """Every draw at every point, errors in (0, 1.5) and falling with more features for the
    default draw; the headline quotes the default count's errors from the same rows."""
    data = run_quick("bench_favor", tmp_path)
    rows = data["results"]
    assert {r["sampling"] for r in rows} == {"orthogonal", "antithetic", "regularized"}
    assert {r["mode"] for r in rows} == {"bidirectional", "causal"}
    for row in rows:
        assert all(0 < e < 1.5 for e in row["errors"].values())
    default = [r for r in rows if r["head_dim"] == 16 and r["sampling"] == "regularized"]
    for row in default:
        assert row["errors"]["44"] < row["errors"]["16"]
    bidirectional = next(r for r in default if r["mode"] == "bidirectional")
    assert f"{bidirectional['errors']['44']:.3f} / " in data["headline"][0]["figure"]
