"""Recording runs in MLflow, and reading them back.

- `store`: which tracking URI to use (flag > $MLFLOW_TRACKING_URI > YAML > ./mlruns), the local
  store layout, SQLite-safe access (locks, retries).
- `logger`: `MlflowLogger`, the trainer callback that logs params, tags and step metrics.
- `models`: a trained Rack as an MLflow model (safetensors + spec) and `load_rack(run_id)`.
- `compare`: `compare_runs` -> polars DataFrame, table formats, pivots, plots.
- `progress`: rich progress of a grid; `ui`: `stackwise ui`.

`stackwise.runner` ties them together for `stackwise run`. Nothing here is imported by
`import stackwise`, so the CLI stays fast for commands that do not track.
"""
