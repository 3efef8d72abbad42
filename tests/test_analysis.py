"""`stackwise.analysis`: replicates, tuned view, power-law frontier, conclusions, report, plot.

Every expected value here comes from an independent reference written in the test: numbers
computed by hand (shown in the comments), a naive loop, scipy called directly, or the true
parameters of synthetic data. No training, no MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats

from stackwise.analysis import (
    FrontierAnalysis,
    ReportDesign,
    aggregate_replicates,
    analyse_frontier,
    describe_gap,
    describe_multiplier,
    epoch_warnings,
    fit_power_law,
    fit_power_law_or_reason,
    format_mean_std,
    frontier_figure,
    frontier_points,
    render_report,
    save_figure,
    select_tuned,
    t_interval,
)

# A realistic reference curve: E = 1, L(1e11) = 2.5, L(1e13) = 1.2.
# A·1e11^-α = 1.5 and A·1e13^-α = 0.2  =>  100^α = 7.5,  α = ln 7.5 / ln 100,  A = 1.5·1e11^α.
E_TRUE = 1.0
ALPHA_TRUE = math.log(7.5) / math.log(100.0)
A_TRUE = 1.5 * 1e11**ALPHA_TRUE
BUDGETS = [1e11, 10**11.5, 1e12, 10**12.5, 1e13]
SEEDS = [0, 1, 2]


def reference_loss(compute: float) -> float:
    return E_TRUE + A_TRUE * compute**-ALPHA_TRUE


# --------------------------------------------------------------------------------------------
# replicates
# --------------------------------------------------------------------------------------------


def test_aggregate_replicates_hand_computed() -> None:
    frame = pl.DataFrame(
        {
            "mode": ["b", "a", "a", "a", "c", "c", "c"],
            "seed": [0, 0, 1, 2, 0, 1, 2],
            "loss": [3.0, 1.0, 1.2, 1.4, 2.0, float("nan"), 2.4],
            "acc": [0.5, 0.1, 0.2, 0.6, 0.3, 0.4, None],
        }
    )
    out = aggregate_replicates(frame, ["mode"], ["loss", "acc"])
    # groups in order of first appearance
    assert out.get_column("mode").to_list() == ["b", "a", "c"]
    rows = {r["mode"]: r for r in out.iter_rows(named=True)}

    # a: loss 1.0, 1.2, 1.4 -> mean 1.2, squared deviations 0.04 + 0 + 0.04 = 0.08,
    # std = sqrt(0.08 / 2) = 0.2, sem = 0.2 / sqrt(3) = 0.1154700538
    a = rows["a"]
    assert a["loss_mean"] == pytest.approx(1.2)
    assert a["loss_std"] == pytest.approx(0.2)
    assert a["loss_sem"] == pytest.approx(0.1154700538)
    assert (a["loss_min"], a["loss_max"]) == pytest.approx((1.0, 1.4))
    assert a["n"] == 3
    # a: acc 0.1, 0.2, 0.6 -> mean 0.3, deviations -0.2, -0.1, 0.3 -> 0.14 / 2 = 0.07
    assert a["acc_mean"] == pytest.approx(0.3)
    assert a["acc_std"] == pytest.approx(math.sqrt(0.07))

    # b: one seed -> std and sem null, n 1
    b = rows["b"]
    assert b["loss_mean"] == pytest.approx(3.0)
    assert b["loss_std"] is None
    assert b["loss_sem"] is None
    assert b["n"] == 1

    # c: the NaN run is missing: loss 2.0, 2.4 -> mean 2.2, std = sqrt(0.08 / 1), sem = std/sqrt 2
    c = rows["c"]
    assert c["loss_mean"] == pytest.approx(2.2)
    assert c["loss_std"] == pytest.approx(math.sqrt(0.08))
    assert c["loss_sem"] == pytest.approx(math.sqrt(0.08) / math.sqrt(2))
    assert c["n"] == 2
    # acc of c: 0.3, 0.4 (null dropped) -> mean 0.35
    assert c["acc_mean"] == pytest.approx(0.35)


def test_format_mean_std() -> None:
    assert format_mean_std(1.234, 0.012, 3) == "1.2340 ± 0.0120 (3)"
    assert format_mean_std(1.234, None, 1) == "1.2340 (1)"
    assert format_mean_std(1.234, 0.5, 1) == "1.2340 (1)"
    assert format_mean_std(1.234, None, 3) == "1.2340 (3)"
    assert format_mean_std(2.0, float("nan"), 2) == "2.0000 (2)"


def test_t_interval_hand_computed() -> None:
    # 0.1, 0.3, 0.2, 0.4: mean 0.25, s^2 = (0.0225 + 0.0025 + 0.0025 + 0.0225) / 3 = 0.05 / 3
    # t_{0.975, 3} = 3.182446305284263 (table), half width = t * s / sqrt(4)
    s = math.sqrt(0.05 / 3)
    half = 3.182446305284263 * s / 2
    mean, low, high = t_interval([0.1, 0.3, 0.2, 0.4])
    assert mean == pytest.approx(0.25)
    assert low == pytest.approx(0.25 - half)
    assert high == pytest.approx(0.25 + half)
    one = t_interval([1.5])
    assert one[0] == 1.5
    assert math.isnan(one[1]) and math.isnan(one[2])
    # NaN values (failed runs) are dropped before counting
    assert t_interval([1.5, float("nan")])[0] == 1.5
    assert math.isnan(t_interval([1.5, float("nan")])[1])


# --------------------------------------------------------------------------------------------
# tuned view
# --------------------------------------------------------------------------------------------

LR = "training.optimizer.lr"
NAN = float("nan")


def _sweep() -> pl.DataFrame:
    """Four grid points, three learning rates, three seeds each."""
    losses: dict[tuple[str, float], dict[float, list[float | None]]] = {
        # middle wins on the seed mean (1.9) although lr 0.01 has the best single run (1.5;
        # its mean is (1.5 + 2.3 + 2.3) / 3 = 2.0333)
        ("rackwise", 1e12): {0.001: [2.0, 2.0, 2.0], 0.003: [1.9, 1.9, 1.9], 0.01: [1.5, 2.3, 2.3]},
        # largest value wins
        ("rackwise", 4e12): {0.001: [1.6, 1.6, 1.6], 0.003: [1.5, 1.5, 1.5], 0.01: [1.4, 1.4, 1.4]},
        # smallest value wins
        ("stackwise", 1e12): {
            0.001: [1.7, 1.8, 1.9],
            0.003: [2.0, 2.0, 2.0],
            0.01: [2.1, 2.1, 2.1],
        },
        # lr 0.01 failed on every seed (NaN / null) and must not win; lr 0.003 lost one seed
        # and wins on its two finite values, mean 1.8 < 1.9
        ("stackwise", 4e12): {
            0.001: [1.9, 1.9, 1.9],
            0.003: [1.8, NAN, 1.8],
            0.01: [NAN, NAN, None],
        },
    }
    rows = []
    for (mode, budget), by_lr in losses.items():
        for lr, values in by_lr.items():
            for seed, value in zip(SEEDS, values, strict=True):
                name = f"{mode}-{budget:.0e}-{lr}-{seed}"
                rows.append((mode, budget, lr, seed, value, name))
    return pl.DataFrame(
        rows,
        schema={
            "mode": pl.String,
            "budget": pl.Float64,
            LR: pl.Float64,
            "seed": pl.Int64,
            "val_loss": pl.Float64,
            "run": pl.String,
        },
        orient="row",
    )


def test_select_tuned_picks_best_seed_mean_and_warns_at_edges() -> None:
    frame = _sweep()
    selection = select_tuned(frame, ["mode", "budget"], [LR])

    choices = {(r["mode"], r["budget"]): r for r in selection.choices.iter_rows(named=True)}
    assert {k: v[LR] for k, v in choices.items()} == {
        ("rackwise", 1e12): 0.003,
        ("rackwise", 4e12): 0.01,
        ("stackwise", 1e12): 0.001,
        ("stackwise", 4e12): 0.003,
    }
    assert choices[("rackwise", 1e12)]["val_loss_mean"] == pytest.approx(1.9)
    assert choices[("stackwise", 1e12)]["val_loss_mean"] == pytest.approx(1.8)
    assert choices[("stackwise", 4e12)]["val_loss_mean"] == pytest.approx(1.8)
    assert choices[("stackwise", 4e12)]["n"] == 2
    assert choices[("rackwise", 1e12)]["n"] == 3
    assert all(r["candidates"] == 3 for r in choices.values())
    assert {k: v["at_edge"] for k, v in choices.items()} == {
        ("rackwise", 1e12): False,
        ("rackwise", 4e12): True,
        ("stackwise", 1e12): True,
        ("stackwise", 4e12): False,
    }

    # the runs are exactly the chosen combination's rows, all seeds, all columns
    assert selection.runs.columns == frame.columns
    expected = frame.filter(
        ((pl.col("mode") == "rackwise") & (pl.col("budget") == 1e12) & (pl.col(LR) == 0.003))
        | ((pl.col("mode") == "rackwise") & (pl.col("budget") == 4e12) & (pl.col(LR) == 0.01))
        | ((pl.col("mode") == "stackwise") & (pl.col("budget") == 1e12) & (pl.col(LR) == 0.001))
        | ((pl.col("mode") == "stackwise") & (pl.col("budget") == 4e12) & (pl.col(LR) == 0.003))
    )
    assert selection.runs.get_column("run").to_list() == expected.get_column("run").to_list()
    assert selection.runs.height == 12

    edge = [w for w in selection.warnings if "extend the sweep" in w]
    assert edge == [
        f"point mode=rackwise,budget=4e12: best {LR} = 0.01 is the largest value tried "
        "(0.001, 0.003, 0.01); extend the sweep",
        f"point mode=stackwise,budget=1e12: best {LR} = 0.001 is the smallest value tried "
        "(0.001, 0.003, 0.01); extend the sweep",
    ]
    # no edge warning in the middle; a warning about the chosen value's failed seed
    assert not any("budget=1e12" in w and "rackwise" in w for w in selection.warnings)
    assert any("mode=stackwise,budget=4e12" in w and "failed runs" in w for w in selection.warnings)


def test_select_tuned_matches_naive_loop() -> None:
    """The choice equals a naive loop over points and learning rates (finite values only)."""
    frame = _sweep()
    selection = select_tuned(frame, ["mode", "budget"], [LR])
    naive: dict[tuple[str, float], float] = {}
    for mode, budget in {(r[0], r[1]) for r in frame.select("mode", "budget").rows()}:
        best_lr, best_mean = None, math.inf
        for lr in (0.001, 0.003, 0.01):
            values = [
                v
                for m, b, r, v in frame.select("mode", "budget", LR, "val_loss").rows()
                if m == mode and b == budget and r == lr and v is not None and not math.isnan(v)
            ]
            if values and sum(values) / len(values) < best_mean:
                best_lr, best_mean = lr, sum(values) / len(values)
        assert best_lr is not None
        naive[(mode, budget)] = best_lr
    got = {(r["mode"], r["budget"]): r[LR] for r in selection.choices.iter_rows(named=True)}
    assert got == naive


def test_failed_combination_never_wins_and_all_failed_point_has_no_choice() -> None:
    frame = pl.DataFrame(
        {
            "mode": ["m"] * 4 + ["n"] * 2,
            "lr": [0.1, 0.1, 0.2, 0.2, 0.1, 0.2],
            "seed": [0, 1, 0, 1, 0, 0],
            "val_loss": [NAN, NAN, 3.0, 3.2, NAN, None],
        }
    )
    selection = select_tuned(frame, ["mode"], ["lr"])
    assert selection.choices.get_column("mode").to_list() == ["m"]
    assert selection.choices.get_column("lr").to_list() == [0.2]
    assert selection.runs.get_column("val_loss").to_list() == [3.0, 3.2]
    assert any("point mode=n" in w and "nothing chosen" in w for w in selection.warnings)


# --------------------------------------------------------------------------------------------
# power law
# --------------------------------------------------------------------------------------------


def test_power_law_recovers_noiseless_parameters() -> None:
    compute = np.geomspace(1e11, 1e13, 6)
    loss = np.array([reference_loss(c) for c in compute])
    assert loss[0] == pytest.approx(2.5) and loss[-1] == pytest.approx(1.2)
    fit = fit_power_law(compute, loss)
    assert fit is not None
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((E_TRUE, A_TRUE, ALPHA_TRUE), rel=0.03)
    assert fit.n_points == 6
    assert fit.rmse < 1e-6
    # predict and its inverse, against the true curve
    assert fit.predict(3e12) == pytest.approx(reference_loss(3e12), rel=1e-6)
    grid = np.array([2e11, 5e12])
    assert fit.predict(grid) == pytest.approx([reference_loss(c) for c in grid], rel=1e-6)
    needed = fit.compute_for(reference_loss(7e11))
    assert needed is not None and needed == pytest.approx(7e11, rel=1e-4)
    assert fit.compute_for(fit.E) is None
    assert fit.compute_for(fit.E - 0.1) is None


def test_power_law_with_small_noise_and_three_decades() -> None:
    rng = np.random.default_rng(0)
    compute = np.geomspace(1e11, 1e13, 7)
    loss = np.array([reference_loss(c) for c in compute]) + rng.normal(0.0, 0.001, compute.size)
    fit = fit_power_law(compute, loss)
    assert fit is not None
    # A for the un-normalised C is the most sensitive parameter: d ln A = ln C0 · d alpha
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((E_TRUE, A_TRUE, ALPHA_TRUE), rel=0.10)

    # three decades, noiseless, different curve
    compute = np.geomspace(1e11, 1e14, 5)
    loss = 0.8 + 3e3 * compute**-0.3
    fit = fit_power_law(compute.tolist(), loss.tolist())
    assert fit is not None
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((0.8, 3e3, 0.3), rel=0.03)


def test_power_law_needs_three_budgets() -> None:
    assert fit_power_law([1e11, 1e12], [2.0, 1.5]) is None
    # many seeds at two budgets are still two budgets
    fit, reason = fit_power_law_or_reason([1e11, 1e11, 1e12, 1e12], [2.0, 2.1, 1.5, 1.6])
    assert fit is None
    assert reason == "2 budgets: a fit needs at least 3"
    # non-finite points do not count as budgets
    assert fit_power_law([1e11, 1e12, 1e13], [2.0, 1.5, NAN]) is None
    # losses that rise with compute have no decreasing power law
    assert fit_power_law([1e11, 1e12, 1e13], [1.5, 1.6, 1.7]) is None


# --------------------------------------------------------------------------------------------
# frontier analysis on synthetic runs
# --------------------------------------------------------------------------------------------

K_FACTOR = 2.0  # stackwise: L(C) = L_ref(C / k) -> needs k times the compute
CROSS_AT = 1e12  # progressive: E = 0.9, alpha = 0.3, meets the reference at 1e12
PROGRESSIVE_A = (reference_loss(CROSS_AT) - 0.9) * CROSS_AT**0.3
# blockwise: reference + 0.01 plus per-seed offsets far larger than the shift
BLOCK_OFFSETS = [0.06, -0.05, 0.02]


def progressive_loss(compute: float) -> float:
    return 0.9 + PROGRESSIVE_A * compute**-0.3


def _synthetic_runs() -> pl.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for budget in BUDGETS:
        for seed in SEEDS:
            ref = reference_loss(budget)
            rows += [
                ("rackwise", budget, seed, ref + rng.normal(0, 1e-3), budget * 1.01),
                (
                    "stackwise",
                    budget,
                    seed,
                    reference_loss(budget / K_FACTOR) + rng.normal(0, 1e-3),
                    budget * 1.02,
                ),
                (
                    "progressive",
                    budget,
                    seed,
                    progressive_loss(budget) + rng.normal(0, 1e-3),
                    budget,
                ),
            ]
    # blockwise: measured at one budget only, paired offsets from the rackwise values
    ref_rows = {(r[1], r[2]): r[3] for r in rows if r[0] == "rackwise"}
    for seed, offset in zip(SEEDS, BLOCK_OFFSETS, strict=True):
        rows.append(("blockwise", 1e12, seed, ref_rows[(1e12, seed)] + 0.01 + offset, 1e12))
    return pl.DataFrame(
        rows,
        schema={
            "mode": pl.String,
            "budget": pl.Float64,
            "seed": pl.Int64,
            "test_loss": pl.Float64,
            "flops": pl.Float64,
        },
        orient="row",
    )


@pytest.fixture(scope="module")
def synthetic() -> pl.DataFrame:
    return _synthetic_runs()


@pytest.fixture(scope="module")
def analysis(synthetic: pl.DataFrame) -> FrontierAnalysis:
    return analyse_frontier(synthetic, reference="rackwise", n_boot=100, rng_seed=0)


def test_frontier_points_hand_computed() -> None:
    frame = pl.DataFrame(
        {
            "mode": ["b", "b", "a", "a", "a", "b"],
            "budget": [2e12, 2e12, 1e12, 1e12, 1e12, 1e12],
            "seed": [0, 1, 0, 1, 2, 0],
            "test_loss": [1.0, 1.2, 2.0, 2.2, NAN, 1.5],
            "flops": [2.0e12, 2.2e12, 1.0e12, 1.0e12, 1.0e12, 1.1e12],
        }
    )
    points = frontier_points(frame)
    assert points.columns == ["mode", "budget", "mean", "std", "n", "flops"]
    # modes by first appearance, budgets ascending
    assert points.select("mode", "budget").rows() == [("b", 1e12), ("b", 2e12), ("a", 1e12)]
    b2 = points.row(1, named=True)
    assert b2["mean"] == pytest.approx(1.1)
    assert b2["std"] == pytest.approx(math.sqrt(0.02))  # (0.01 + 0.01) / 1
    assert b2["n"] == 2
    assert b2["flops"] == pytest.approx(2.1e12)
    assert points.row(0, named=True)["std"] is None
    a1 = points.row(2, named=True)
    assert (a1["mean"], a1["n"]) == (pytest.approx(2.1), 2)  # the NaN run is dropped


def test_paired_gap_matches_scipy(synthetic: pl.DataFrame, analysis: FrontierAnalysis) -> None:
    def value(mode: str, budget: float, seed: int) -> float:
        row = synthetic.filter(
            (pl.col("mode") == mode) & (pl.col("budget") == budget) & (pl.col("seed") == seed)
        )
        return float(row.get_column("test_loss")[0])

    for gap in analysis.gaps:
        diffs = np.array(
            [value(gap.mode, gap.budget, s) - value("rackwise", gap.budget, s) for s in SEEDS]
        )
        mean = diffs.mean()
        low, high = stats.t.interval(
            0.95, df=diffs.size - 1, loc=mean, scale=diffs.std(ddof=1) / math.sqrt(diffs.size)
        )
        assert gap.n == 3
        assert gap.mean == pytest.approx(mean, abs=1e-12)
        assert (gap.low, gap.high) == pytest.approx((low, high), abs=1e-12)
    assert {g.mode for g in analysis.gaps} == {"stackwise", "progressive", "blockwise"}
    assert len([g for g in analysis.gaps if g.mode == "blockwise"]) == 1


def test_paired_gap_uses_seeds_present_in_both() -> None:
    frame = pl.DataFrame(
        {
            "mode": ["rackwise"] * 3 + ["stackwise"] * 4,
            "budget": [1e12] * 7,
            "seed": [0, 1, 2, 0, 1, 2, 3],
            "test_loss": [2.0, 2.1, NAN, 2.3, 2.2, 2.0, 1.0],
        }
    )
    gaps = analyse_frontier(frame, n_boot=0).gaps
    assert len(gaps) == 1
    # pairs: seed 0 (+0.3), seed 1 (+0.1); seed 2 failed for the reference, seed 3 unpaired
    # mean 0.2, s = sqrt(0.02), t_{0.975, 1} = 12.706204736174705, half = t * s / sqrt(2) = t * 0.1
    assert gaps[0].n == 2
    assert gaps[0].mean == pytest.approx(0.2)
    assert (gaps[0].low, gaps[0].high) == pytest.approx(
        (0.2 - 1.2706204736174705, 0.2 + 1.2706204736174705)
    )


def test_conclusions_follow_the_intervals(analysis: FrontierAnalysis) -> None:
    by_key = {(g.mode, g.budget): g for g in analysis.gaps}

    # blockwise by hand: diffs 0.01 + offsets = 0.07, -0.04, 0.03 -> mean 0.02
    # squared deviations 0.0025 + 0.0036 + 0.0001 = 0.0062, s = sqrt(0.0031)
    # half = t_{0.975, 2} * s / sqrt 3 = 4.302652729911275 * 0.0321455 = 0.138312 -> covers 0
    block = by_key[("blockwise", 1e12)]
    half = 4.302652729911275 * math.sqrt(0.0031) / math.sqrt(3)
    assert block.mean == pytest.approx(0.02, abs=1e-9)
    assert (block.low, block.high) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-9)
    text = describe_gap(block.mode, block.reference, block.mean, block.low, block.high, 1e12)
    assert text.startswith("no measurable difference between blockwise and rackwise")
    assert "better" not in text and "worse" not in text

    for budget in BUDGETS:
        # stackwise is the reference curve shifted by a factor 2 in compute: clearly higher loss
        worse = by_key[("stackwise", budget)]
        assert worse.low > 0
        assert describe_gap(
            worse.mode, worse.reference, worse.mean, worse.low, worse.high, budget
        ).startswith("stackwise is worse than rackwise by")
    # progressive is clearly lower at the smallest budget (0.31 nats by construction)
    low_budget = by_key[("progressive", 1e11)]
    assert low_budget.mean == pytest.approx(progressive_loss(1e11) - reference_loss(1e11), abs=0.01)
    sentence = describe_gap(
        "progressive", "rackwise", low_budget.mean, low_budget.low, low_budget.high, 1e11
    )
    assert sentence.startswith("progressive is better than rackwise by")


def test_describe_gap_and_multiplier_sentences() -> None:
    assert describe_gap("stackwise", "rackwise", 0.05, 0.03, 0.07, 1e12) == (
        "stackwise is worse than rackwise by 0.050 nats at 1e+12 FLOPs "
        "(+0.050 nats, 95 % CI +0.030 to +0.070)"
    )
    assert describe_gap("stackwise", "rackwise", -0.05, -0.07, -0.03, 3e12) == (
        "stackwise is better than rackwise by 0.050 nats at 3e+12 FLOPs "
        "(-0.050 nats, 95 % CI -0.070 to -0.030)"
    )
    assert describe_gap("stackwise", "rackwise", 0.01, -0.02, 0.04, 1e12) == (
        "no measurable difference between stackwise and rackwise at 1e+12 FLOPs "
        "(+0.010 nats, 95 % CI -0.020 to +0.040)"
    )
    one = describe_gap("stackwise", "rackwise", 0.01, NAN, NAN, 1e12)
    assert "one seed, no interval (+0.010 nats); no conclusion" in one
    assert "no measurable compute difference" in describe_multiplier(
        "stackwise", "rackwise", 1.1, 0.9, 1.3, 1e12
    )
    assert describe_multiplier("stackwise", "rackwise", 2.0, 1.8, 2.2, 1e12).startswith(
        "stackwise needs 2.00× the compute of rackwise"
    )
    assert describe_multiplier("stackwise", "rackwise", 0.5, 0.4, 0.6, 1e12).startswith(
        "stackwise needs only 0.50× the compute of rackwise"
    )
    assert "no compute multiplier" in describe_multiplier(
        "stackwise", "rackwise", None, NAN, NAN, 1e12
    )
    assert "no conclusion" in describe_multiplier("stackwise", "rackwise", 2.0, NAN, NAN, 1e12)


def test_multiplier_recovers_the_compute_factor(analysis: FrontierAnalysis) -> None:
    stack = [m for m in analysis.multipliers if m.mode == "stackwise"]
    assert [m.budget for m in stack] == pytest.approx(BUDGETS)
    for m in stack:
        assert m.value is not None
        assert m.value == pytest.approx(K_FACTOR, rel=0.05)
        assert m.low <= m.value <= m.high
        assert m.low == pytest.approx(K_FACTOR, rel=0.05)
        assert m.high == pytest.approx(K_FACTOR, rel=0.05)
        assert m.defined == 1.0
    # blockwise has one budget: no fit, a reason, and no multiplier
    fits = {f.mode: f for f in analysis.fits}
    assert fits["blockwise"].fit is None
    assert fits["blockwise"].reason == "1 budget: a fit needs at least 3"
    assert all(m.mode != "blockwise" for m in analysis.multipliers)
    # the reference's fit recovers its true curve
    ref = fits["rackwise"].fit
    assert ref is not None
    assert ref.alpha == pytest.approx(ALPHA_TRUE, rel=0.05)


def test_crossover_near_the_analytic_point(analysis: FrontierAnalysis) -> None:
    cross = {c.mode: c for c in analysis.crossovers}
    progressive = cross["progressive"]
    assert progressive.budget is not None
    assert progressive.budget == pytest.approx(CROSS_AT, rel=0.05)
    assert progressive.inside is True
    assert progressive.low <= progressive.budget <= progressive.high
    assert progressive.defined == pytest.approx(1.0)
    # parallel curves (compute factor 2) never meet
    assert cross["stackwise"].budget is None
    assert cross["stackwise"].inside is None
    # the multiplier of progressive crosses 1 at the crossing: below 1 before, above 1 after
    values = {m.budget: m.value for m in analysis.multipliers if m.mode == "progressive"}
    assert values[1e11] is not None and values[1e11] < 1
    assert values[1e13] is not None and values[1e13] > 1


def test_to_frames_tables(analysis: FrontierAnalysis) -> None:
    frames = analysis.to_frames()
    assert set(frames) >= {"gaps", "multipliers", "fits"}
    assert frames["gaps"].height == len(analysis.gaps)
    assert frames["multipliers"].height == len(analysis.multipliers)
    fits = frames["fits"]
    assert fits.get_column("mode").to_list() == [
        "rackwise",
        "stackwise",
        "progressive",
        "blockwise",
    ]
    assert fits.filter(pl.col("mode") == "blockwise").get_column("E").to_list() == [None]
    assert any("3 seeds" in note for note in analysis.notes)


def test_epoch_warnings() -> None:
    frame = pl.DataFrame({"run": ["a", "b", "c", "d"], "epochs": [1.0, 4.0, 4.5, None]})
    lines = epoch_warnings(frame)
    assert len(lines) == 1
    assert lines[0].startswith("run c: 4.50 epochs")
    assert epoch_warnings(frame.drop("epochs")) == []


# --------------------------------------------------------------------------------------------
# report and figure
# --------------------------------------------------------------------------------------------


def _report_runs() -> pl.DataFrame:
    """rackwise and stackwise differ only by per-seed noise; two learning rates per point."""
    noise = {0: 0.02, 1: -0.02, 2: 0.01}
    rows = []
    for budget in [1e11, 1e12, 1e13]:
        for mode in ("rackwise", "stackwise"):
            sign = 1.0 if mode == "rackwise" else -1.0
            for lr, penalty in ((0.001, 0.05), (0.003, 0.0)):
                for seed in SEEDS:
                    test = reference_loss(budget) + penalty + sign * noise[seed]
                    rows.append(
                        (
                            f"{mode}-{budget:.0e}-{lr}-s{seed}",
                            mode,
                            budget,
                            lr,
                            seed,
                            test - 0.01,
                            test,
                            5.0
                            if (mode, budget, lr, seed) == ("rackwise", 1e13, 0.003, 0)
                            else 2.0,
                        )
                    )
    return pl.DataFrame(
        rows,
        schema=["run", "mode", "budget", LR, "seed", "val_loss", "test_loss", "epochs"],
        orient="row",
    )


def _design() -> ReportDesign:
    return ReportDesign(
        experiment="frontier-test",
        description="synthetic runs",
        model="tiny: 4 layers, d=128",
        modes=("rackwise", "stackwise"),
        budgets=(1e11, 1e12, 1e13),
        seeds=(0, 1, 2),
        tuned={LR: (0.001, 0.003)},
        data_source="synthetic",
        train_tokens=1_000_000,
        machine="cpu",
        date="2025-01-01",
        commit="abc1234",
        command="stackwise run experiments/frontier.yaml",
    )


def test_report_sections_and_covering_intervals(tmp_path: Path) -> None:
    runs = _report_runs()
    tuned = select_tuned(runs, ["mode", "budget"], [LR])
    frontier = analyse_frontier(tuned.runs, n_boot=50)
    # every gap interval covers zero: by hand, diffs are -0.04, +0.04, -0.02 at each budget
    for gap in frontier.gaps:
        assert gap.low <= 0 <= gap.high
        assert gap.mean == pytest.approx(-0.02 / 3)
    text = render_report(_design(), runs, tuned, frontier, "frontier.png")

    headings = [
        "## Question",
        "## Design",
        "## Results",
        "## Paired differences",
        "## Frontier",
        "## Conclusions",
        "## Warnings",
    ]
    positions = [text.index(h) for h in headings]
    assert positions == sorted(positions)
    assert "depth-wise training" in text and "end-to-end" in text
    for fact in ("frontier-test", "tiny: 4 layers", "abc1234", "2025-01-01", "1,000,000"):
        assert fact in text
    # tuned choices table: 6 points, all at the largest lr 0.003 (an edge of the sweep)
    assert f"| mode | budget | {LR} | seeds |" in text
    assert text.count("| 0.003 | 3 |") == 6
    assert "is the largest value tried (0.001, 0.003); extend the sweep" in text
    # results: hand-computed mean ± std for rackwise at 1e12 (reference + 0.02, -0.02, +0.01)
    mean = reference_loss(1e12) + 0.01 / 3
    std = float(np.std([0.02, -0.02, 0.01], ddof=1))
    assert f"| rackwise | 1e+12 | {mean:.4f} ± {std:.4f} (3) |" in text
    assert "![test_loss against compute](frontier.png)" in text
    # conclusions: a covering interval never reads better or worse
    conclusions = text[text.index("## Conclusions") : text.index("## Warnings")]
    assert conclusions.count("no measurable difference between stackwise and rackwise") == 3
    assert "better" not in text and "worse" not in text
    # epochs: one run above 4 epochs, in the conclusions and the warnings
    assert "1 of 36 runs passed over the training data more than 4 times" in conclusions
    assert "run rackwise-1e+13-0.003-s0: 5.00 epochs" in text
    # deterministic
    assert render_report(_design(), runs, tuned, frontier, "frontier.png") == text


def test_report_clear_difference_and_missing_frontier() -> None:
    runs = _report_runs().with_columns(
        pl.when(pl.col("mode") == "stackwise")
        .then(pl.col("test_loss") + 0.3 + 2 * pl.col("seed").cast(pl.Float64) * 0.01)
        .otherwise(pl.col("test_loss"))
        .alias("test_loss")
    )
    tuned = select_tuned(runs, ["mode", "budget"], [LR])
    frontier = analyse_frontier(tuned.runs, n_boot=50)
    text = render_report(_design(), runs, tuned, frontier, None)
    assert "stackwise is worse than rackwise by" in text
    assert "![" not in text

    text = render_report(_design(), runs, tuned, None, None)
    assert "## Frontier\n\nNot computed" in text
    assert "## Paired differences\n\nNot computed" in text


def test_report_says_why_there_is_no_fit() -> None:
    runs = _report_runs().filter(pl.col("budget") < 1e13)
    tuned = select_tuned(runs, ["mode", "budget"], [LR])
    frontier = analyse_frontier(tuned.runs, n_boot=20)
    text = render_report(_design(), runs, tuned, frontier, None)
    assert "no fit: 2 budgets: a fit needs at least 3" in text


def test_frontier_figure_saves_png(
    tmp_path: Path, synthetic: pl.DataFrame, analysis: FrontierAnalysis
) -> None:
    points = frontier_points(synthetic)
    figure = frontier_figure(points, analysis.fits_by_mode())
    axis = figure.axes[0]
    assert axis.get_xscale() == "log"
    legend = axis.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert "band: ±1 std over seeds" in labels
    assert {"rackwise", "stackwise", "progressive", "blockwise"} <= set(labels)
    path = save_figure(figure, tmp_path / "plots" / "frontier.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
