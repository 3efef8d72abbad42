"""The comparison plots (PNG artifacts of a parent run, and `stackwise compare --plot DIR`):
validation loss against executed FLOPs, tokens and wall-clock seconds, one line per run
(replicates as their mean with a min-max band) in one panel per training mode, and final
validation loss against training memory, one point per run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackwise.analysis.plots import MODE_COLOURS, SPARE_COLOURS
from stackwise.tracking.compare.common import plural
from stackwise.tracking.compare.curves import (
    X_AXES,
    RunCurve,
    client_history,
    client_timestamps,
    curve_points,
    final_point,
    load_curves,
    mean_curve,
    replicate_groups,
    uses_training_memory,
)

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from mlflow import MlflowClient

    from stackwise.tracking.sqlite_runs import SqliteRuns

    Reader = MlflowClient | SqliteRuns

PLOT_FILES = (
    "loss_over_flops.png",
    "loss_over_tokens.png",
    "val_loss_memory.png",
    "loss_over_time.png",
)
# Qualitative colours (matplotlib's tab10) for the lines of one panel.
PANEL_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
LINE_STYLES: tuple[Any, ...] = (
    "-",
    "--",
    ":",
    "-.",
    (0, (5, 1)),
    (0, (3, 1, 1, 1, 1, 1)),
    (0, (1, 3)),
    (0, (8, 3, 2, 3)),
)
POINT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STAGE_MARKER = "D"
LEGEND_ROWS = 40  # legend entries in one column; more go in two
NAMED_POINTS = 10  # up to this many points carry their run name; more carry a number
PANEL_COLUMNS = 3  # loss panels side by side; more modes wrap to another row
_AGAINST = {
    "flops": ("executed training FLOPs", "executed training FLOPs", "flops"),
    "tokens": ("training tokens", "training tokens seen", "tokens"),
    "seconds": ("wall-clock time", "wall-clock seconds since training start", "wall time"),
}


def _palette(curves: Sequence[RunCurve]) -> tuple[dict[str, str], dict[str, int]]:
    """Colour per mode and style index per other-coordinates value, in order of appearance.

    Colours are by training mode, as in the frontier plot (blockwise and layerwise are the same
    thing); other modes, and mode labels a preset axis invents, take the spare colours in order.
    """
    colours: dict[str, str] = {}
    spare = iter(SPARE_COLOURS * (1 + len(curves) // len(SPARE_COLOURS)))
    for curve in curves:
        if curve.mode not in colours:
            colours[curve.mode] = MODE_COLOURS.get(curve.mode) or next(spare)
    styles = {s: i for i, s in enumerate(dict.fromkeys(c.style for c in curves))}
    return colours, styles


def _new_figure(width: float, height: float, constrained: bool = False) -> Figure:
    """A figure on the Agg canvas (files only; no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def _log_axis(axis: Any, values: Sequence[float], which: str = "x") -> None:
    """Log scale with ticks at 1-2-5 (or decades over a wide range), labelled 200k, 1.5G, 2T."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0 and math.isfinite(v)]
    getattr(axis, f"set_{which}scale")("log")
    target = axis.xaxis if which == "x" else axis.yaxis
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    if decades > 3:
        subs: tuple[float, ...] = (1.0,)
    elif decades > 1:
        subs = (1.0, 2.0, 5.0)
    else:
        subs = tuple(float(s) for s in range(1, 10))
    target.set_major_locator(LogLocator(base=10, subs=subs))
    target.set_major_formatter(EngFormatter(places=None, sep=""))
    target.set_minor_formatter(NullFormatter())
    if positive and decades < 0.3:  # one point, or nearly: keep a readable span around it
        middle = math.sqrt(max(positive) * min(positive))
        getattr(axis, f"set_{which}lim")(middle / 2.5, middle * 2.5)


def _height(entries: int) -> float:
    """Figure height (inches) that fits a one-column legend of `entries` beside the axes."""
    return max(5.5, 0.19 * min(entries, LEGEND_ROWS) + 1.0)


def _legend_entry(label: str, **style: Any) -> Line2D:
    """A legend entry that draws no data: a marker or line in `style`, or the label alone."""
    from matplotlib.lines import Line2D

    return Line2D([], [], label=label, **{"linestyle": "", **style})


def _legend_outside(
    axis: Any,
    handles: list[Any],
    title: str | None = None,
    labels: list[str] | None = None,
    below: bool = False,
) -> None:
    """A legend right of the axes (`below`: under them, in the panel's width): it never covers
    data."""
    placement: dict[str, Any] = (
        {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14)}
        if below
        else {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}
    )
    axis.legend(
        handles=handles,
        labels=labels if labels is not None else [h.get_label() for h in handles],
        borderaxespad=0.0,
        fontsize=8,
        handlelength=3.5,  # long enough to tell the dash patterns apart
        title=title,
        title_fontsize=8,
        ncol=1 if len(handles) <= LEGEND_ROWS else 2,
        frameon=False,
        alignment="left",
        **placement,
    )


def _panel_coordinates(groups: Sequence[Sequence[RunCurve]]) -> tuple[str | None, list[str]]:
    """The grid coordinate that colours the lines of a panel, the one with the most distinct
    values among them (the first in column order on a tie), and the others that vary (line
    style). None when no coordinate varies, or when they leave two lines alike (runs that
    differ in something else, e.g. reruns): each line then takes its own colour."""
    names = list(dict.fromkeys(name for group in groups for name in group[0].coordinates))
    counts = {name: len({group[0].coordinates.get(name) for group in groups}) for name in names}
    varying = [name for name in names if counts[name] > 1]
    values = {tuple(group[0].coordinates.get(name) for name in varying) for group in groups}
    if not varying or len(values) < len(groups):
        return None, []
    colour = max(varying, key=lambda name: counts[name])
    return colour, [name for name in varying if name != colour]


def _panel_styles(
    mode: str, groups: Sequence[Sequence[RunCurve]], colour_by: str | None, style_by: list[str]
) -> list[tuple[str, Any]]:
    """(colour, line style) of each line of a panel: colour by `colour_by` (each line its own
    when None), line style by the values of `style_by`; no two lines alike. A panel of one line
    takes the mode's colour (as in the memory plot)."""
    if len(groups) == 1:
        return [(MODE_COLOURS.get(mode) or PANEL_COLOURS[0], LINE_STYLES[0])]
    firsts = [group[0] for group in groups]
    colour_keys: list[Any] = (
        list(range(len(firsts)))
        if colour_by is None
        else [c.coordinates.get(colour_by) for c in firsts]
    )
    style_keys = [tuple(c.coordinates.get(name) for name in style_by) for c in firsts]
    colour_index = {key: i for i, key in enumerate(dict.fromkeys(colour_keys))}
    style_index = {key: i for i, key in enumerate(dict.fromkeys(style_keys))}
    looks = []
    for colour_key, style_key in zip(colour_keys, style_keys, strict=True):
        colour = colour_index[colour_key]
        # Past the palette's last colour, colours repeat with the next line styles.
        style = style_index[style_key] + colour // len(PANEL_COLOURS) * len(style_index)
        looks.append(
            (PANEL_COLOURS[colour % len(PANEL_COLOURS)], LINE_STYLES[style % len(LINE_STYLES)])
        )
    return looks


def loss_figure(curves: Sequence[RunCurve], x: str = "flops") -> Figure:
    """Validation loss against executed training FLOPs (`x="flops"`), training tokens
    (`x="tokens"`) or wall-clock seconds since training started (`x="seconds"`).

    One panel per training mode (one mode: one panel), all sharing the y axis and the x range.
    In a panel each line is a run, coloured by the grid coordinate that varies most within the
    mode, line style by the others that vary; diamonds where a depth-wise stage ends and the
    next begins. Replicates (runs that differ only in their seed) are one line, their mean,
    with a shaded min-max band. Each panel's legend names its lines by those coordinates.
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, not {x!r}")
    groups = replicate_groups(curves)
    panels: dict[str, list[list[RunCurve]]] = {}
    for group in groups:
        panels.setdefault(group[0].mode, []).append(group)
    single = len(panels) <= 1
    columns = min(PANEL_COLUMNS, max(len(panels), 1))
    rows = math.ceil(max(len(panels), 1) / columns)
    if single:
        figure = _new_figure(11, _height(len(groups) + 1))
        axes = [figure.add_subplot()]
    else:
        rows_entries = [
            max(len(g) + 1 for g in list(panels.values())[r * columns : (r + 1) * columns])
            for r in range(rows)
        ]
        height = sum(4.3 + 0.17 * min(n, LEGEND_ROWS) for n in rows_entries) + 0.5
        figure = _new_figure(5.2 * columns, height, constrained=True)
        grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
        axes = [axis for row in grid for axis in row]
        for spare in axes[len(panels) :]:
            figure.delaxes(spare)
    against, x_label, what = _AGAINST[x]
    every_x: list[float] = []
    final_only = 0
    for index, (mode, mode_groups) in enumerate(panels.items()):
        axis = axes[index]
        colour_by, style_by = _panel_coordinates(mode_groups)
        named = [name for name in (colour_by, *style_by) if name is not None]
        looks = _panel_styles(mode, mode_groups, colour_by, style_by)
        handles: list[Any] = []
        labels: list[str] = []
        marked = False
        for group, (colour, style) in zip(mode_groups, looks, strict=True):
            curve = group[0]
            entry = ", ".join(f"{n}={curve.coordinates.get(n, '')}" for n in named)
            entry = entry or curve.group or curve.label
            if len(group) == 1:
                xs, ys, marks = curve_points(curve, x)
                label = curve.label
                if not xs:
                    label += f" (no {what} / validation loss recorded)"
                    entry += f" (no {what} / validation loss recorded)"
                elif x == "seconds" and not curve.seconds:
                    final_only += 1
                    entry += " (final point: wall_time_s)"
            else:
                xs, ys, low, high, marks = mean_curve(group, x)
                label = f"{curve.group}: mean of {len(group)} seeds (band: min-max)"
                entry += f" (mean of {len(group)} seeds, band: min-max)"
                axis.fill_between(xs, low, high, color=colour, alpha=0.18, linewidth=0)
            every_x.extend(xs)
            marked = marked or bool(marks)
            (line,) = axis.plot(
                xs,
                ys,
                color=colour,
                linestyle=style,
                linewidth=1.6,
                # Markers only where a stage ends, or for a run that is a single point.
                marker=STAGE_MARKER if marks else ("o" if len(xs) == 1 else None),
                markevery=marks or None,
                markersize=5,
                label=label,
            )
            # The legend shows the line's colour and dashes, not the stage markers over them.
            handles.append(
                _legend_entry(entry, color=colour, linestyle=style, linewidth=1.6)
                if marks
                else line
            )
            labels.append(entry)
        if marked:
            boundary = "stage boundary (depth-wise)"
            handles.append(
                _legend_entry(boundary, color="black", marker=STAGE_MARKER, markersize=5)
            )
            labels.append(boundary)
        title = mode
        if colour_by is not None:
            title += f": colour {colour_by}"
            if style_by:
                title += f", line style {' / '.join(style_by)}"
        count = plural(sum(len(g) for g in mode_groups), "run")
        if not single:
            axis.set_title(f"{mode} ({count})", fontsize=10)
        axis.set_xlabel(x_label)
        if single or index % columns == 0:
            axis.set_ylabel("validation loss")
        axis.xaxis.set_tick_params(labelbottom=True)
        axis.grid(True, which="major", alpha=0.3)
        _legend_outside(axis, handles, title=title, labels=labels, below=not single)
    if x == "seconds":
        axes[0].set_xlim(left=0)
    else:
        _log_axis(axes[0], every_x)
    count = plural(len(curves), "run")
    if len(groups) < len(curves):
        count += f", {plural(len(groups), 'line')}: replicate seeds averaged"
    heading = f"validation loss vs {against} ({count})"
    if x == "seconds":
        heading += "\nseconds since training start, from the MLflow timestamps of val/loss"
        if final_only:
            heading += f"; {plural(final_only, 'run')} without them: final point (wall_time_s)"
    if single:
        axes[0].set_title(heading)
    else:
        figure.suptitle(heading)
    return figure


def memory_figure(curves: Sequence[RunCurve]) -> Figure:
    """Final validation loss against training memory (weights, gradients, optimizer state and
    saved activations of the largest stage, ``training_memory_mb``): one labelled point per
    run, colour by mode, marker by the other grid coordinates. A run that did not record its
    training memory stands at its peak process memory (``peak_memory_mb``) as a hollow marker,
    and the axis label and legend say so. Beyond `NAMED_POINTS` runs a point carries a number
    and the legend names it (long names would bury the points)."""
    colours, styles = _palette(curves)
    points = [final_point(curve) for curve in curves]
    present = [(c, p) for c, p in zip(curves, points, strict=True) if p is not None]
    peak_only = [c for c, _ in present if not uses_training_memory(c)]
    numbered = len(present) > NAMED_POINTS
    shown_styles = [s for s in styles if s] if len(styles) > 1 else []
    missing = [c.label for c, p in zip(curves, points, strict=True) if p is None]
    entries = len(colours) + len(shown_styles) + (len(present) if numbered else 0) + len(missing)
    figure = _new_figure(11, _height(entries + 1))
    axis = figure.add_subplot()
    for curve, point in zip(curves, points, strict=True):
        colour = colours[curve.mode]
        peak = point is not None and not uses_training_memory(curve)
        axis.plot(
            [point[0]] if point else [],
            [point[1]] if point else [],
            linestyle="",
            marker=POINT_MARKERS[styles[curve.style] % len(POINT_MARKERS)],
            markersize=8,
            color=colour,
            markerfacecolor="none" if peak else colour,
            markeredgewidth=1.5,
            label=curve.label
            + (" (no result)" if point is None else " (peak memory)" if peak else ""),
        )
    memory = [p[0] for _, p in present]
    axis.grid(True, alpha=0.3)
    axis.margins(x=0.15, y=0.12)
    if memory and max(memory) / max(min(memory), 1e-9) > 20:
        _log_axis(axis, memory)
    elif memory:
        axis.set_xlim(left=0)  # from zero: the distances show the ratios of memory
    x_label = "training memory (MiB): weights, gradients, optimizer state, activations"
    if peak_only:
        x_label += (
            f"\nhollow: peak process memory (MiB), for {plural(len(peak_only), 'run')} "
            "without a recorded training memory"
        )
    axis.set_xlabel(x_label)
    axis.set_ylabel("final validation loss")
    axis.set_title(f"final validation loss vs training memory ({plural(len(curves), 'run')})")
    names = [str(i + 1) if numbered else c.label for i, (c, _) in enumerate(present)]
    _label_points(figure, axis, [(n, *p) for n, (_, p) in zip(names, present, strict=True)])
    handles: list[Any] = [
        _legend_entry(mode, color=c, marker="o", markersize=7) for mode, c in colours.items()
    ]
    handles += [
        _legend_entry(
            style,
            color="grey",
            marker=POINT_MARKERS[styles[style] % len(POINT_MARKERS)],
            markersize=7,
        )
        for style in shown_styles
    ]
    if peak_only:
        handles.append(
            _legend_entry(
                "hollow: peak process memory (no training memory recorded)",
                color="grey",
                marker="o",
                markerfacecolor="none",
                markersize=7,
            )
        )
    if numbered:
        handles += [
            _legend_entry(f"{number}: {curve.label}")
            for number, (curve, _) in zip(names, present, strict=True)
        ]
    handles += [_legend_entry(f"no result: {name}") for name in missing]
    _legend_outside(axis, handles, title="mode / coordinates" if shown_styles else "mode")
    return figure


def _label_points(figure: Any, axis: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Name each point beside it (left of points in the right part of the axes, so a label stays
    inside), moving labels down until none overlaps another."""
    from matplotlib.text import Text

    figure.canvas.draw()  # settles the axis limits, hence where each point lands
    renderer = figure.canvas.get_renderer()
    to_axes = axis.transData + axis.transAxes.inverted()
    # A thin leader line from each label to its point, visible once a label has moved away.
    leader = {"arrowstyle": "-", "color": "grey", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 4}
    texts, sides = [], []
    for label, x, y in points:
        side = -1.0 if to_axes.transform((x, y))[0] > 0.6 else 1.0
        sides.append(side)
        texts.append(
            axis.annotate(
                label,
                (x, y),
                xytext=(6 * side, 4),
                textcoords="offset points",
                ha="left" if side > 0 else "right",
                fontsize=7,
                arrowprops=leader,
            )
        )
    figure.canvas.draw()  # lays the new labels out
    points_per_pixel = 72.0 / figure.dpi
    order = sorted(range(len(texts)), key=lambda i: -points[i][2])
    settled: list[Any] = []
    for index in order:
        text = texts[index]
        offset_y = 4.0
        for _ in range(100):
            box = Text.get_window_extent(text, renderer)  # the words, not the leader line
            clash = next((b for b in settled if box.overlaps(b)), None)
            if clash is None:
                break
            offset_y -= (box.y1 - clash.y0) * points_per_pixel + 1.0
            text.set_position((6 * sides[index], offset_y))
        settled.append(Text.get_window_extent(text, renderer))


def save_plots(
    client: Reader | Mapping[str, Reader], frame: pl.DataFrame, folder: str | Path
) -> list[Path]:
    """`PLOT_FILES` for the runs of `frame` into `folder`: ``loss_over_flops.png``,
    ``loss_over_tokens.png`` and ``loss_over_time.png`` (`loss_figure`) and
    ``val_loss_memory.png`` (`memory_figure`). `client` reads every run, or is
    ``run id -> client`` of each run's store. The same runs give the same bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if frame.is_empty():
        return []
    curves = load_curves(frame, client_history(client), client_timestamps(client))
    figures = (
        loss_figure(curves, "flops"),
        loss_figure(curves, "tokens"),
        memory_figure(curves),
        loss_figure(curves, "seconds"),
    )
    return [
        _save_figure(figure, folder / name)
        for figure, name in zip(figures, PLOT_FILES, strict=True)
    ]


def _save_figure(figure: Any, path: Path) -> Path:
    """PNG at 100 dpi, cropped to what is drawn (legends outside the axes included)."""
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path
