"""Report: one deterministic markdown document from the runs, the tuned view and the frontier.

Method:

1. ``## Question``: fixed text. ``## Design``: the experiment as declared (`ReportDesign`):
   model, modes, budgets, seeds, the tuned settings with the values tried, the chosen value
   per grid point (table from `TunedSelection.choices`), data and the epochs the runs reached,
   machine, date, commit and command. Nothing is measured or timestamped here.
2. ``## Results``: per mode and budget the tuned, seed-averaged test (and validation) loss as
   ``mean ± std (n)`` (`aggregate_replicates` over `TunedSelection.runs`).
3. ``## Paired differences`` and ``## Frontier``: the tables of `FrontierAnalysis` (gaps with
   intervals; fit parameters, or why there is no fit; multipliers and crossovers with bootstrap
   intervals) and the plot link when one is given.
4. ``## Conclusions``: bullets written only by `stackwise.analysis.conclusions` from the numbers
   of those tables: one per mode and budget (loss gap), one per mode (multiplier at the largest
   reference budget where it exists), one on epochs when a run exceeds the limit.
5. ``## Warnings``: tuning edge warnings, epoch warnings and the analysis' notes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from stackwise.analysis.conclusions import describe_epochs, describe_gap, describe_multiplier
from stackwise.analysis.frontier import FrontierAnalysis, epoch_warnings
from stackwise.analysis.replicates import aggregate_replicates, format_mean_std
from stackwise.analysis.tuning import TunedSelection, format_value

__all__ = ["QUESTION", "ReportDesign", "render_report"]

QUESTION = (
    "Does depth-wise training (layer-wise, stack-wise, progressive growth) match end-to-end "
    "training at equal compute?"
)


@dataclass(frozen=True)
class ReportDesign:
    """What the experiment was meant to be, and how to read its runs.

    `tuned`: each tuned setting and the values tried (empty: read from the runs). Empty
    `modes`, `budgets` and `seeds` are read from the runs too. The column names say where the
    runs frame keeps mode, budget, seed, the losses, the epochs and the run name.
    """

    experiment: str
    description: str = ""
    model: str = ""
    modes: Sequence[str] = ()
    budgets: Sequence[float] = ()
    seeds: Sequence[Any] = ()
    tuned: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    data_source: str = ""
    train_tokens: int | None = None
    machine: str = ""
    date: str = ""
    commit: str = ""
    command: str = ""
    reference: str = "rackwise"
    mode_column: str = "mode"
    budget_column: str = "budget"
    seed_column: str = "seed"
    test_metric: str = "test_loss"
    val_metric: str = "val_loss"
    epochs_column: str = "epochs"
    run_column: str = "run"
    epoch_limit: float = 4.0


def _cell(value: Any) -> str:
    text = "—" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _flops(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2g}"


def _number(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def _interval(low: float, high: float, spec: str = "+.3f", suffix: str = "") -> str:
    if math.isnan(low) or math.isnan(high):
        return "—"
    return f"{low:{spec}}{suffix} to {high:{spec}}{suffix}"


def _percent(level: float) -> str:
    return f"{level * 100:g} %"


def _unique(frame: pl.DataFrame, column: str) -> list[Any]:
    if column not in frame.columns:
        return []
    return [v for v in dict.fromkeys(frame.get_column(column).to_list()) if v is not None]


def _listing(values: Sequence[Any], formatter: Any = format_value) -> str:
    return ", ".join(formatter(v) for v in values) if values else "—"


def _design(design: ReportDesign, runs: pl.DataFrame, tuned: TunedSelection) -> list[str]:
    modes = list(design.modes) or _unique(runs, design.mode_column)
    budgets = list(design.budgets) or sorted(_unique(runs, design.budget_column))
    seeds = list(design.seeds) or _unique(runs, design.seed_column)
    tried = dict(design.tuned) or {
        c: sorted(_unique(runs, c), key=lambda v: (str(type(v)), v)) for c in tuned.tuned
    }
    lines = [
        f"- Experiment: {design.experiment}",
        f"- Description: {design.description or '—'}",
        f"- Model: {design.model or '—'}",
        f"- Modes: {_listing(modes, str)} (reference: {design.reference})",
        f"- Budgets (FLOPs): {_listing(budgets, _flops)}",
        f"- Seeds: {_listing(seeds)}",
    ]
    if tried:
        lines.append(
            "- Tuned settings (values tried; the best seed-mean "
            f"{tuned.metric} is kept per grid point):"
        )
        lines += [f"  - {name}: {_listing(values)}" for name, values in tried.items()]
    else:
        lines.append("- Tuned settings: none")
    tokens = f"{design.train_tokens:,}" if design.train_tokens is not None else "—"
    lines.append(f"- Data: {design.data_source or '—'}; training tokens: {tokens}")
    epochs = _epochs(runs, design.epochs_column)
    if epochs:
        lines.append(
            f"- Epochs over the training data: max {max(epochs):.2f}, "
            f"median {statistics.median(epochs):.2f} ({len(epochs)} runs)"
        )
    lines += [
        f"- Runs: {runs.height} in total, {tuned.runs.height} in the tuned view",
        f"- Machine: {design.machine or '—'}",
        f"- Date: {design.date or '—'}",
        f"- Commit: {design.commit or '—'}",
        f"- Command: `{design.command}`" if design.command else "- Command: —",
    ]
    if tuned.choices.height:
        lines += ["", "Chosen values per grid point:", ""]
        choices = tuned.choices
        mean_column = f"{tuned.metric}_mean"
        headers = [
            *tuned.point,
            *tuned.tuned,
            "seeds",
            f"mean {tuned.metric}",
            "combinations tried",
            "at edge",
        ]
        rows = [
            [
                *(
                    _flops(row[c])
                    if c == design.budget_column and isinstance(row[c], (int, float))
                    else format_value(row[c])
                    for c in tuned.point
                ),
                *(format_value(row[c]) for c in tuned.tuned),
                row["n"],
                _number(row[mean_column]),
                row["candidates"],
                "yes" if row["at_edge"] else "no",
            ]
            for row in choices.iter_rows(named=True)
        ]
        lines += _table(headers, rows)
    return lines


def _epochs(runs: pl.DataFrame, column: str) -> list[float]:
    if column not in runs.columns:
        return []
    values = [v for v in runs.get_column(column).cast(pl.Float64).to_list() if v is not None]
    return [v for v in values if math.isfinite(v)]


def _results(design: ReportDesign, tuned: TunedSelection) -> list[str]:
    runs = tuned.runs
    group = [design.mode_column, design.budget_column]
    metrics = [m for m in (design.test_metric, design.val_metric) if m in runs.columns]
    if runs.height == 0 or not metrics or any(c not in runs.columns for c in group):
        return ["No tuned runs to show."]
    # one summary per metric, so that each count is that metric's own number of values
    summaries = [aggregate_replicates(runs, group, [m]).iter_rows(named=True) for m in metrics]
    order = list(design.modes) or _unique(runs, design.mode_column)
    rank = {m: i for i, m in enumerate(order)}
    table_rows: list[tuple[tuple[int, float], list[Any]]] = []
    for parts in zip(*summaries, strict=True):
        first = parts[0]
        cells: list[Any] = [first[design.mode_column], _flops(first[design.budget_column])]
        for metric, part in zip(metrics, parts, strict=True):
            cells.append(format_mean_std(part[f"{metric}_mean"], part[f"{metric}_std"], part["n"]))
        budget = first[design.budget_column]
        key = (rank.get(first[design.mode_column], len(rank)), float(budget or 0.0))
        table_rows.append((key, cells))
    table_rows.sort(key=lambda item: item[0])
    labels = {design.test_metric: "test loss", design.val_metric: "val loss"}
    lines = [
        "Tuned runs, averaged over seeds: mean ± std (number of seeds with a value), in nats.",
        "",
    ]
    headers = ["mode", "budget (FLOPs)", *(labels[m] for m in metrics)]
    return lines + _table(headers, [cells for _, cells in table_rows])


def _gaps(frontier: FrontierAnalysis | None) -> list[str]:
    if frontier is None:
        return ["Not computed (no frontier analysis)."]
    if not frontier.gaps:
        return [f"No budget has seeds measured for both a mode and {frontier.reference}."]
    ci = f"{_percent(frontier.level)} CI (Student t)"
    rows = [
        [
            f"{g.mode} − {g.reference}",
            _flops(g.budget),
            f"{g.mean:+.4f}",
            _interval(g.low, g.high, "+.4f"),
            g.n,
        ]
        for g in frontier.gaps
    ]
    lines = [
        f"Difference in {frontier.metric} on the same seed (negative: the mode has the lower "
        "loss), in nats.",
        "",
    ]
    return lines + _table(["difference", "budget (FLOPs)", "mean", ci, "pairs"], rows)


def _frontier(frontier: FrontierAnalysis | None, plot_path: str | None) -> list[str]:
    if frontier is None:
        return ["Not computed (no frontier analysis)."]
    lines = [
        f"Fits of L(C) = E + A·C^(−α) to the per-budget seed means of {frontier.metric} "
        "(C in FLOPs):",
        "",
    ]
    rows = []
    for item in frontier.fits:
        fit = item.fit
        if fit is None:
            rows.append([item.mode, "—", "—", "—", "—", item.budgets, f"no fit: {item.reason}"])
        else:
            rows.append(
                [
                    item.mode,
                    f"{fit.E:.4f}",
                    f"{fit.A:.4g}",
                    f"{fit.alpha:.4f}",
                    f"{fit.rmse:.4f}",
                    item.budgets,
                    "",
                ]
            )
    lines += _table(["mode", "E", "A", "α", "rmse", "budgets", "note"], rows)
    ci = f"{_percent(frontier.level)} CI (bootstrap)"
    if frontier.multipliers:
        lines += [
            "",
            f"Compute multiplier: the compute a mode needs to reach the fitted "
            f"{frontier.reference} loss at each {frontier.reference} budget, divided by that "
            "budget (> 1: the mode needs more compute).",
            "",
        ]
        rows = [
            [
                m.mode,
                _flops(m.budget),
                "none" if m.value is None else f"{m.value:.3f}×",
                "—" if m.value is None else _interval(m.low, m.high, ".3f", "×"),
                _number(m.defined, ".2f"),
            ]
            for m in frontier.multipliers
        ]
        lines += _table(["mode", "budget (FLOPs)", "multiplier", ci, "resamples defined"], rows)
    if frontier.crossovers:
        lines += [
            "",
            f"Crossover: the budget where a mode's fitted curve meets {frontier.reference}'s "
            "(none: they do not meet in the searched range). Bootstrap intervals here and above "
            "are taken over the resamples where the quantity exists (last column).",
            "",
        ]
        rows = [
            [
                c.mode,
                _flops(c.budget) if c.budget is not None else "none",
                "—" if c.budget is None else _interval(c.low, c.high, ".2g"),
                f"{_flops(c.search_low)} to {_flops(c.search_high)}",
                f"{_flops(c.measured_low)} to {_flops(c.measured_high)}",
                "—" if c.inside is None else ("yes" if c.inside else "no"),
                _number(c.defined, ".2f"),
            ]
            for c in frontier.crossovers
        ]
        lines += _table(
            [
                "mode",
                "crossover (FLOPs)",
                ci,
                "searched",
                "measured",
                "inside measured",
                "resamples defined",
            ],
            rows,
        )
    if not frontier.multipliers and all(f.fit is None for f in frontier.fits):
        lines += ["", "No multiplier or crossover: no mode has a fit."]
    elif not frontier.multipliers:
        reference_fit = frontier.fit_for(frontier.reference)
        why = "the reference has no fit" if reference_fit is None else "no other mode has a fit"
        lines += ["", f"No multiplier or crossover: {why}."]
    if frontier.n_boot:
        lines += [
            "",
            f"Bootstrap: {frontier.n_boot} resamples of the {frontier.n_seeds} seeds, shared by "
            "all modes.",
        ]
    if plot_path:
        lines += ["", f"![{frontier.metric} against compute]({plot_path})"]
    return lines


def _conclusions(
    design: ReportDesign, runs: pl.DataFrame, frontier: FrontierAnalysis | None
) -> list[str]:
    bullets: list[str] = []
    if frontier is not None:
        for g in frontier.gaps:
            bullets.append(
                describe_gap(g.mode, g.reference, g.mean, g.low, g.high, g.budget, g.level)
            )
        modes = list(dict.fromkeys(m.mode for m in frontier.multipliers))
        for mode in modes:
            defined = [m for m in frontier.multipliers if m.mode == mode and m.value is not None]
            if defined:
                last = max(defined, key=lambda m: m.budget)
                bullets.append(
                    describe_multiplier(
                        last.mode,
                        last.reference,
                        last.value,
                        last.low,
                        last.high,
                        last.budget,
                        last.level,
                    )
                )
    epochs = _epochs(runs, design.epochs_column)
    over = [e for e in epochs if e > design.epoch_limit]
    if over:
        bullets.append(describe_epochs(len(over), runs.height, design.epoch_limit, max(over)))
    if not bullets:
        return ["None: no paired difference or multiplier was computed."]
    return [f"- {b}" for b in bullets]


def render_report(
    design: ReportDesign,
    runs: pl.DataFrame,
    tuned: TunedSelection,
    frontier: FrontierAnalysis | None,
    plot_path: str | None,
) -> str:
    """The markdown report (see the module docstring); `runs` are all runs of the sweep."""
    warnings = [
        *tuned.warnings,
        *epoch_warnings(runs, design.epochs_column, design.epoch_limit, design.run_column),
        *(frontier.notes if frontier is not None else ()),
    ]
    sections = [
        [f"# {design.experiment}"],
        ["## Question", "", QUESTION],
        ["## Design", "", *_design(design, runs, tuned)],
        ["## Results", "", *_results(design, tuned)],
        ["## Paired differences", "", *_gaps(frontier)],
        ["## Frontier", "", *_frontier(frontier, plot_path)],
        ["## Conclusions", "", *_conclusions(design, runs, frontier)],
        ["## Warnings", "", *([f"- {w}" for w in warnings] or ["None."])],
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"
