"""Where every benchmark's result goes: printed as JSON and written to benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def publish(name: str, result: dict[str, Any], out: str | Path | None = None) -> Path:
    """Print `result` as JSON and write it to `out` (default: ``results/<name>.json``)."""
    text = json.dumps(result, indent=2)
    print(text)
    path = Path(out) if out is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path
