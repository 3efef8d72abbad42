"""The comparison plots (PNG artifacts of a parent run, and `stackwise compare --plot DIR`):
validation loss against executed FLOPs and against tokens, one line per run (replicates as their
mean with a min-max band), and final validation loss against peak memory, one point per run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackwise.analysis.plots import MODE_COLOURS, SPARE_COLOURS
from stackwise.tracking.compare.common import plural
from stackwise.tracking.compare.curves import (
    RunCurve,
    client_history,
    curve_points,
    final_point,
    load_curves,
    mean_curve,
    replicate_groups,
)

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from mlflow import MlflowClient

PLOT_FILES = ("loss_over_flops.png", "loss_over_tokens.png", "val_loss_memory.png")
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


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (files only; no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
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
    """A legend entry that draws no data: a marker in `style`, or the label alone."""
    from matplotlib.lines import Line2D

    return Line2D([], [], linestyle="", label=label, **style)


def _legend_outside(axis: Any, handles: list[Any], title: str | None = None) -> None:
    """A legend right of the axes: it never covers data."""
    axis.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=8,
        title=title,
        title_fontsize=8,
        ncol=1 if len(handles) <= LEGEND_ROWS else 2,
        frameon=False,
    )


def loss_figure(curves: Sequence[RunCurve], x: str = "flops") -> Figure:
    """Validation loss against executed training FLOPs (`x="flops"`) or training tokens
    (`x="tokens"`): one line per run on one axis, colour by mode, line style by the other grid
    coordinates, diamonds where a depth-wise stage ends and the next begins. Replicates (runs
    that differ only in their seed) are one line, their mean, with a shaded min-max band."""
    if x not in ("flops", "tokens"):
        raise ValueError(f"x must be 'flops' or 'tokens', not {x!r}")
    groups = replicate_groups(curves)
    figure = _new_figure(11, _height(len(groups) + 1))
    axis = figure.add_subplot()
    colours, styles = _palette(curves)
    handles: list[Any] = []
    every_x: list[float] = []
    for group in groups:
        curve = group[0]
        if len(group) == 1:
            xs, ys, marks = curve_points(curve, x)
            label = curve.label if xs else f"{curve.label} (no {x} / validation loss recorded)"
        else:
            xs, ys, low, high, marks = mean_curve(group, x)
            label = f"{curve.group}: mean of {len(group)} seeds (band: min-max)"
            axis.fill_between(xs, low, high, color=colours[curve.mode], alpha=0.18, linewidth=0)
        every_x.extend(xs)
        (line,) = axis.plot(
            xs,
            ys,
            color=colours[curve.mode],
            linestyle=LINE_STYLES[styles[curve.style] % len(LINE_STYLES)],
            linewidth=1.6,
            # Markers only where a stage ends, or for a run that is a single point.
            marker=STAGE_MARKER if marks else ("o" if len(xs) == 1 else None),
            markevery=marks or None,
            markersize=5,
            label=label,
        )
        handles.append(line)
    if any(curve_points(c, x)[2] for c in curves):
        handles.append(
            _legend_entry(
                "stage boundary (depth-wise)", color="black", marker=STAGE_MARKER, markersize=5
            )
        )
    _log_axis(axis, every_x)
    axis.set_xlabel("executed training FLOPs" if x == "flops" else "training tokens seen")
    axis.set_ylabel("validation loss")
    against = "executed training FLOPs" if x == "flops" else "training tokens"
    count = plural(len(curves), "run")
    if len(groups) < len(curves):
        count += f", {plural(len(groups), 'line')}: replicate seeds averaged"
    axis.set_title(f"validation loss vs {against} ({count})")
    axis.grid(True, which="major", alpha=0.3)
    _legend_outside(axis, handles)
    return figure


def memory_figure(curves: Sequence[RunCurve]) -> Figure:
    """Final validation loss against peak memory: one labelled point per run, colour by mode,
    marker by the other grid coordinates. Beyond `NAMED_POINTS` runs a point carries a number
    and the legend names it (long names would bury the points)."""
    colours, styles = _palette(curves)
    points = [final_point(curve) for curve in curves]
    present = [(c, p) for c, p in zip(curves, points, strict=True) if p is not None]
    numbered = len(present) > NAMED_POINTS
    shown_styles = [s for s in styles if s] if len(styles) > 1 else []
    missing = [c.label for c, p in zip(curves, points, strict=True) if p is None]
    entries = len(colours) + len(shown_styles) + (len(present) if numbered else 0) + len(missing)
    figure = _new_figure(11, _height(entries))
    axis = figure.add_subplot()
    for curve, point in zip(curves, points, strict=True):
        axis.plot(
            [point[0]] if point else [],
            [point[1]] if point else [],
            linestyle="",
            marker=POINT_MARKERS[styles[curve.style] % len(POINT_MARKERS)],
            markersize=8,
            color=colours[curve.mode],
            label=curve.label if point else f"{curve.label} (no result)",
        )
    memory = [p[0] for _, p in present]
    if memory and max(memory) / max(min(memory), 1e-9) > 20:
        _log_axis(axis, memory)
    axis.set_xlabel("peak memory (MiB)")
    axis.set_ylabel("final validation loss")
    axis.set_title(f"final validation loss vs peak memory ({plural(len(curves), 'run')})")
    axis.grid(True, alpha=0.3)
    axis.margins(x=0.15, y=0.12)
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
    client: MlflowClient | Mapping[str, MlflowClient], frame: pl.DataFrame, folder: str | Path
) -> list[Path]:
    """`PLOT_FILES` for the runs of `frame` into `folder`: ``loss_over_flops.png`` and
    ``loss_over_tokens.png`` (`loss_figure`) and ``val_loss_memory.png`` (`memory_figure`).
    `client` reads every run, or is ``run id -> client`` of each run's store."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if frame.is_empty():
        return []
    curves = load_curves(frame, client_history(client))
    figures = (loss_figure(curves, "flops"), loss_figure(curves, "tokens"), memory_figure(curves))
    return [
        _save_figure(figure, folder / name)
        for figure, name in zip(figures, PLOT_FILES, strict=True)
    ]


def _save_figure(figure: Any, path: Path) -> Path:
    """PNG at 100 dpi, cropped to what is drawn (legends outside the axes included)."""
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path
