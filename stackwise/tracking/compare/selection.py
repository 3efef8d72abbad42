"""Which grid-point runs a comparison shows: every run of the experiments read from MLflow,
then per grid point the latest FINISHED run of its current identity (or of its run name), with
notes on what is left out, or every run grouped by grid point for ``--all``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from stackwise.config.base import NOT_IDENTITY
from stackwise.tracking.compare.common import plural
from stackwise.tracking.logger import TAG_CONFIG_HASH, TAG_PARENT, TAG_ROLE, TAG_RUN_NAME
from stackwise.tracking.sqlite_runs import SqliteRuns

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run


def search_point_runs(
    client: MlflowClient | SqliteRuns,
    experiment_ids: list[str],
    run_ids: Iterable[str] | None = None,
) -> list[Run]:
    """All grid-point runs of the experiments (every page), oldest first."""
    if isinstance(client, SqliteRuns):
        return _only(client.point_runs(experiment_ids, TAG_ROLE), run_ids)  # type: ignore[arg-type]
    from mlflow.entities import ViewType

    filter_string = f"tags.`{TAG_ROLE}` = 'point'"
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return _only(runs, run_ids)


def _only(runs: list[Run], run_ids: Iterable[str] | None) -> list[Run]:
    if run_ids is None:
        return runs
    wanted = set(run_ids)
    return [r for r in runs if r.info.run_id in wanted]


def _config_hash(run: Run) -> str:
    return run.data.tags.get(TAG_CONFIG_HASH, run.info.run_id)


def point_name(run: Run) -> str:
    """The name of a run's grid point (its run name)."""
    return run.data.tags.get(TAG_RUN_NAME) or run.info.run_name or run.info.run_id


def _latest(runs: Sequence[Run]) -> Run:
    """The latest FINISHED run of `runs` (oldest first), else the latest attempt."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or list(runs))[-1]


def _grouped(runs: Sequence[Run], key: Callable[[Run], str]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def select_runs(
    runs: Sequence[Run], current: Sequence[str] | None, label: str, notes: list[str] | None = None
) -> list[Run]:
    """The runs the default view shows, in grid order (`runs` oldest first).

    With `current` (run identities of a file's grid points, grid order): per hash its latest
    FINISHED run, else its latest attempt. Without: the same per grid point (run name). What is
    left out, and grid points that have no run yet, are reported in `notes` under `label`.
    """
    if current is None:
        chosen = [_latest(group) for group in _grouped(runs, point_name).values()]
    else:
        by_hash = _grouped(runs, _config_hash)
        chosen = [_latest(by_hash[h]) for h in current if h in by_hash]
        missing = len([h for h in current if h not in by_hash])
        if missing and notes is not None:
            notes.append(
                f"{label}: {plural(missing, 'grid point')} of the current settings "
                f"{'has' if missing == 1 else 'have'} no run yet (stackwise run starts them)"
            )
    left_out = len(runs) - len(chosen)
    if left_out and notes is not None:
        shown = {_config_hash(r) for r in chosen}
        other = len([r for r in runs if _config_hash(r) not in shown])
        parts = []
        if other:
            parts.append(plural(other, "run") + " of other settings")
        if left_out - other:
            parts.append(plural(left_out - other, "other attempt"))
        notes.append(f"{label}: not shown: {' and '.join(parts)}; --all lists every run")
    if notes is not None:
        notes.extend(f"{label}: {line}" for line in settings_outside_grid(runs, chosen))
    return chosen


# Params that never make two runs compute different things (`NOT_IDENTITY`), and the grid's
# own coordinates.
_NOT_SETTINGS = (*(".".join(path) for path in NOT_IDENTITY), "grid.", "tune.")


def _grid_driven(runs: Sequence[Run], key: str) -> bool:
    """Whether the grid sets `key`: its value differs between runs of one `stackwise run` (one
    parent run); where no run shares its parent with another, whether it matches one grid
    coordinate value for value."""
    by_parent = _grouped(runs, lambda r: r.data.tags.get(TAG_PARENT, r.info.run_id))
    shared = [group for group in by_parent.values() if len(group) > 1]
    if shared:
        return any(len({r.data.params.get(key) for r in group}) > 1 for group in shared)
    axes = {k for r in runs for k in r.data.params if k.startswith("grid.")}
    for axis in axes:
        pairs = {(r.data.params.get(axis), r.data.params.get(key)) for r in runs}
        if len(pairs) == len({a for a, _ in pairs}) == len({v for _, v in pairs}):
            return True
    return False


def settings_outside_grid(runs: Sequence[Run], shown: Sequence[Run], limit: int = 3) -> list[str]:
    """A line for each setting (up to `limit`) whose value differs between the `shown` runs
    although the grid does not set it — runs of different budgets, learning rates or seeds
    side by side, which a comparison must not read as the grid's effect. `runs` are all the
    runs of the experiments, which tell what the grid sets (`_grid_driven`)."""
    if len(shown) < 2:
        return []
    keys = sorted({k for r in shown for k in r.data.params if not k.startswith(_NOT_SETTINGS)})
    lines: list[str] = []
    for key in keys:
        values = {r.data.params.get(key) for r in shown}
        if len(values) < 2 or _grid_driven(runs, key):
            continue
        groups: dict[str, list[Run]] = {}
        for run in shown:
            groups.setdefault(str(run.data.params.get(key, "-")), []).append(run)
        listed = "; ".join(
            f"{value} in {', '.join(point_name(r) for r in group)}"
            for value, group in groups.items()
        )
        lines.append(
            f"shown runs differ in {key}, which the grid does not set ({listed}); their "
            "difference is not the grid's alone"
        )
    if len(lines) > limit:
        lines = [*lines[:limit], f"and {len(lines) - limit} more settings differ (--all)"]
    return lines


def all_in_point_order(runs: Sequence[Run], chosen: Sequence[Run]) -> list[Run]:
    """Every run, grouped by grid point (points in the order of `chosen`, then the rest), each
    point's runs oldest first."""
    groups = _grouped(runs, point_name)
    order = list(dict.fromkeys([point_name(r) for r in chosen] + list(groups)))
    return [run for name in order for run in groups[name]]


def differing_params(runs: Sequence[Run]) -> list[str]:
    """Param keys whose value differs between runs of one grid point (a missing param counts
    as a value), sorted."""
    keys: set[str] = set()
    for group in _grouped(runs, point_name).values():
        if len(group) < 2:
            continue
        for key in set().union(*(r.data.params for r in group)):
            if len({r.data.params.get(key) for r in group}) > 1:
                keys.add(key)
    return sorted(keys)
