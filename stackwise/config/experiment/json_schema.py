"""JSON Schema for editors: the schema files of experiment files and plain run configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stackwise.config.base import StackWiseConfig
from stackwise.config.experiment.schema import SECTIONS, ExperimentConfig

SCHEMA_FILES = {
    "experiment.schema.json": "experiment",
    "stackwise-config.schema.json": "run",
}
_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def run_config_json_schema() -> dict[str, Any]:
    """JSON Schema of a plain run config (`StackWiseConfig`)."""
    schema = StackWiseConfig.model_json_schema()
    return {"$schema": _DRAFT, **schema}


def experiment_json_schema() -> dict[str, Any]:
    """JSON Schema of an experiment file, with the base sections typed as the run config's."""
    schema = ExperimentConfig.model_json_schema()
    run = StackWiseConfig.model_json_schema()
    definitions = schema.setdefault("$defs", {})
    definitions.update(run.get("$defs", {}))
    for section in SECTIONS:
        described = schema["properties"][section].get("description")
        reference = dict(run["properties"][section])
        if described:
            reference["description"] = described
        schema["properties"][section] = reference
    schema["$defs"] = dict(sorted(definitions.items()))
    return {"$schema": _DRAFT, **schema}


def json_schema_texts() -> dict[str, str]:
    """File name -> text of every schema file in `schemas/`."""
    builders = {"experiment": experiment_json_schema, "run": run_config_json_schema}
    return {
        filename: json.dumps(builders[kind](), indent=2, ensure_ascii=False) + "\n"
        for filename, kind in SCHEMA_FILES.items()
    }


def _differing(folder: Path) -> list[tuple[Path, str]]:
    """Each schema file in `folder` that is missing or differs from what the code generates,
    with the text it should have."""
    found: list[tuple[Path, str]] = []
    for filename, text in json_schema_texts().items():
        target = folder / filename
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            found.append((target, text))
    return found


def write_json_schemas(directory: str | Path) -> list[Path]:
    """Write the schema files; returns the paths that changed."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    changed = _differing(folder)
    for target, text in changed:
        target.write_text(text, encoding="utf-8")
    return [target for target, _ in changed]


def stale_json_schemas(directory: str | Path) -> list[Path]:
    """The schema files that are missing or differ from what the code generates."""
    return [target for target, _ in _differing(Path(directory))]
