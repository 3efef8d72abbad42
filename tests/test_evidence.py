"""Evidence from replicated, tuned runs through the real command line: `compare` aggregates
seeds and picks each point's best tuned value on validation loss, `--frontier` compares every
mode with rackwise at every budget, and `report` writes the document (a real MLflow store)."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

import pytest

# The CLI tests share 24 tracked runs through the real CLI: about a minute on 2 idle cores.
slow = pytest.mark.slow

GRID = """
name: evidence
model: {d_model: 32, n_heads: 2, architecture: {n_stacks: 2, blocks_per_stack: 1}}
training:
  seq_len: 32
  batch_size: 4
  eval: {every_steps: 100, batches: 2}
  log_every_steps: 100
data: {max_tokens: 40000}
tracking: {log_model: false}
grid:
  mode: [layerwise, rackwise]
  budget: [2.0e8, 6.0e8, 1.8e9]
tune:
  lr: [0.001, 0.01]
seeds: [0, 1]
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, cli: Any) -> Path:
    folder = tmp_path_factory.mktemp("evidence")
    (folder / "evidence.yaml").write_text(textwrap.dedent(GRID).lstrip(), encoding="utf-8")
    result = cli("run", "evidence.yaml", "--threads", "1", cwd=folder, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@slow
def test_compare_aggregates_seeds_at_the_best_validation_value(store: Path, cli: Any) -> None:
    runs = _json(cli("compare", "evidence.yaml", "--all", "--format", "json", cwd=store))
    assert len(runs) == 2 * 3 * 2 * 2 and all(r["status"] == "FINISHED" for r in runs)
    points = _json(cli("compare", "evidence.yaml", "--format", "json", cwd=store))
    assert len(points) == 6
    for point in points:
        mine = [r for r in runs if r["point"] == point["run"]]
        # Independent choice: mean validation loss over seeds per learning rate, lowest wins.
        by_lr: dict[str, list[dict[str, Any]]] = {}
        for run in mine:
            by_lr.setdefault(run["lr"], []).append(run)
        best = min(by_lr, key=lambda lr: statistics.mean(r["val_loss"] for r in by_lr[lr]))
        assert math.isclose(point["lr"], float(best))
        chosen = by_lr[best]
        tests = [r["test_loss"] for r in chosen]
        assert point["n"] == len(chosen) == 2
        assert point["test_loss_mean"] == pytest.approx(statistics.mean(tests))
        assert point["test_loss_std"] == pytest.approx(statistics.stdev(tests))
        vals = [r["val_loss"] for r in chosen]
        assert point["val_loss_mean"] == pytest.approx(statistics.mean(vals))
    table = cli("compare", "evidence.yaml", cwd=store)
    assert table.returncode == 0, table.stderr
    assert " ± " in table.stdout and "(2)" in table.stdout
    # two values tried: the best one is always at an edge of the sweep
    assert "extend the sweep" in table.stderr


@slow
def test_frontier_pairs_every_mode_with_rackwise_on_the_same_seeds(store: Path, cli: Any) -> None:
    result = _json(cli("compare", "evidence.yaml", "--frontier", "--format", "json", cwd=store))
    runs = _json(cli("compare", "evidence.yaml", "--all", "--format", "json", cwd=store))
    points = _json(cli("compare", "evidence.yaml", "--format", "json", cwd=store))
    chosen = {p["run"]: p["lr"] for p in points}

    def tuned(mode: str, budget: float) -> dict[int, float]:
        rows = [
            r
            for r in runs
            if r["mode"] == mode
            and float(r["budget"]) == budget
            and math.isclose(float(r["lr"]), chosen[r["point"]])
        ]
        return {r["seed"]: r["test_loss"] for r in rows}

    gaps = result["gaps"]
    assert {(g["mode"], g["budget"]) for g in gaps} == {
        ("layerwise", b) for b in (2.0e8, 6.0e8, 1.8e9)
    }
    for gap in gaps:
        mode, reference = tuned("layerwise", gap["budget"]), tuned("rackwise", gap["budget"])
        differences = [mode[s] - reference[s] for s in sorted(mode)]
        assert gap["n"] == 2
        assert gap["mean"] == pytest.approx(statistics.mean(differences))
        # Student t with 1 degree of freedom: mean ± 12.706 * sd / sqrt(2)
        half = 12.7062047 * statistics.stdev(differences) / math.sqrt(2)
        assert gap["low"] == pytest.approx(gap["mean"] - half, rel=1e-4, abs=1e-9)
        assert gap["high"] == pytest.approx(gap["mean"] + half, rel=1e-4, abs=1e-9)
    assert {f["mode"] for f in result["fits"]} == {"layerwise", "rackwise"}
    assert len(result["points"]) == 6 and all(p["n"] == 2 for p in result["points"])


@slow
def test_frontier_refuses_without_a_budget_axis_and_report_writes_the_document(
    store: Path, cli: Any, tmp_path: Path
) -> None:
    # A file without the budget axis: a clear refusal, exit 2.
    single = store / "single.yaml"
    text = textwrap.dedent(GRID).lstrip().replace("  budget: [2.0e8, 6.0e8, 1.8e9]\n", "")
    single.write_text(text.replace("training:\n", "training:\n  budget: {steps: 4}\n"), "utf-8")
    refused = cli("compare", "single.yaml", "--frontier", "--only", "seed=0", cwd=store)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "training.budget.flops" in refused.stderr

    out = tmp_path / "report.md"
    result = cli("report", "evidence.yaml", "-o", out, "--bootstrap", "200", cwd=store)
    assert result.returncode == 0, result.stderr
    report = out.read_text(encoding="utf-8")
    for heading in (
        "## Question",
        "## Design",
        "## Results",
        "## Paired differences",
        "## Frontier",
        "## Conclusions",
    ):
        assert heading in report
    assert (tmp_path / "report_frontier.png").stat().st_size > 1000
    assert "report_frontier.png" in report
    assert "logged report.md on run" in result.stderr


def _runs_frame() -> Any:
    """A comparison frame as `runs_frame` gives it for a file with `tune: {lr: …}` and
    `seeds: [0, 1, 2]` (labels as text, one row per run)."""
    import polars as pl

    rows = []
    # point -> lr -> per-seed (val, test); at rackwise lr 0.01 has the best single run but not
    # the best mean.
    table = {
        "mode=rackwise": {
            "0.001": [(2.0, 2.1), (2.2, 2.3), (2.1, 2.2)],
            "0.01": [(1.5, 1.6), (2.9, 3.0), (2.8, 2.9)],
        },
        "mode=layerwise": {
            "0.001": [(2.5, 2.6), (2.4, 2.5), (2.6, 2.7)],
            "0.01": [(2.3, 2.35), (2.2, 2.25), float("nan")],  # seed 2 failed
        },
    }
    for point, sweep in table.items():
        for lr, results in sweep.items():
            for seed, result in enumerate(results):
                val, test = (float("nan"), None) if isinstance(result, float) else result
                rows.append(
                    {
                        "experiment": "x",
                        "run": f"{point},lr={lr},seed={seed}",
                        "mode": point.split("=")[1],
                        "lr": lr,
                        "seed": seed,
                        "point": point,
                        "status": "FAILED" if test is None else "FINISHED",
                        "val_loss": None if test is None else val,
                        "test_loss": test,
                        "flops": 1e12,
                        "run_id": f"{point}{lr}{seed}",
                        "parent_run_id": "p",
                        "tuned_axes": "lr",
                    }
                )
    return pl.DataFrame(rows)


def test_point_view_chooses_on_mean_validation_loss_and_aggregates_the_chosen_seeds() -> None:
    from stackwise.tracking.evidence import comparison_table

    frame = _runs_frame()
    table, notes = comparison_table(frame, "json")
    rows = {row["run"]: row for row in table.iter_rows(named=True)}
    # rackwise: means 2.1 (lr 0.001) vs 2.4 (lr 0.01, despite its best single run of 1.5)
    rack = rows["mode=rackwise"]
    assert rack["lr"] == 0.001 and rack["n"] == 3
    assert rack["test_loss_mean"] == pytest.approx((2.1 + 2.3 + 2.2) / 3)
    assert rack["test_loss_std"] == pytest.approx(statistics.stdev([2.1, 2.3, 2.2]))
    assert rack["val_loss_mean"] == pytest.approx(2.1)
    # layerwise: lr 0.01 (mean 2.25 over the two seeds that finished) beats 0.001 (2.5)
    layer = rows["mode=layerwise"]
    assert layer["lr"] == 0.01 and layer["n"] == 2
    assert layer["test_loss_mean"] == pytest.approx(2.3)
    assert any("smallest value tried" in n and "mode=rackwise" in n for n in notes)
    assert any("largest value tried" in n and "mode=layerwise" in n for n in notes)
    shown, _ = comparison_table(frame, "table")
    assert shown.filter(shown["run"] == "mode=rackwise")["test_loss"][0] == "2.2000 ± 0.1000 (3)"
    # --all keeps every run; --pivot with --agg count counts the chosen runs of a cell
    every, _ = comparison_table(frame, "json", all_runs=True)
    assert every.height == 12
    counted, _ = comparison_table(frame, "json", pivot="mode x lr", agg="count")
    assert counted.filter(counted["mode"] == "rackwise")["0.001"][0] == 3


def test_loss_plot_draws_replicates_as_their_mean_with_a_min_max_band() -> None:
    from stackwise.tracking.compare import RunCurve, loss_figure

    def curve(seed: int, losses: list[float], group: str | None) -> RunCurve:
        steps = [10, 20, 30]
        return RunCurve(
            label=f"mode=rackwise,lr=0.01,seed={seed}",
            mode="rackwise",
            style="",
            val=list(zip(steps, losses, strict=True)),
            tokens=[(s, 100.0 * s) for s in steps],
            flops=[(s, 1e9 * s) for s in steps],
            group=group,
        )

    replicates = [
        curve(0, [3.0, 2.0, 1.5], "mode=rackwise,lr=0.01"),
        curve(1, [3.4, 2.2, 1.7], "mode=rackwise,lr=0.01"),
        curve(2, [3.2, 2.6, 1.6], "mode=rackwise,lr=0.01"),
    ]
    alone = curve(0, [4.0, 3.0, 2.5], None)
    figure = loss_figure([*replicates, alone])
    axis = figure.axes[0]
    lines = [line for line in axis.lines if len(line.get_xdata())]
    assert len(lines) == 2  # one mean line for the three seeds, one for the single run
    assert list(lines[0].get_ydata()) == pytest.approx([3.2, 2.2666667, 1.6])
    assert list(lines[0].get_xdata()) == pytest.approx([1e10, 2e10, 3e10])
    band = axis.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == pytest.approx(1.5) and max(band) == pytest.approx(3.4)
    assert "mean of 3 seeds (band: min-max)" in lines[0].get_label()
    assert list(lines[1].get_ydata()) == [4.0, 3.0, 2.5]
