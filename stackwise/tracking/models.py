"""A trained Rack as an MLflow model, and loading it back by run id.

Why a pyfunc model logged from code rather than ``mlflow.pytorch.log_model``: the PyTorch flavour
pickles the whole module, so loading it unpickles whatever the file holds and breaks when classes
move. Here the model is two plain files — ``weights.safetensors`` (tensors only; a tied LM head is
stored once) and ``rack_spec.json`` (``rack.spec()``, everything ``create_rack_from_specs`` needs)
— plus the reviewed `stackwise.tracking.rack_pyfunc` code that MLflow runs to serve it. The model
carries a signature (``input_ids`` int64 [B, T] -> ``logits`` float32 [B, T, vocab]).

`load_rack(run_id)` does not go through pyfunc at all: it downloads the two files and rebuilds the
Rack, which then gives the same logits as the trained one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackwise.tracking.store import resolve_tracking_uri, retry_locked, use_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature

    from stackwise.model.architecture import Rack

MODEL_NAME = "model"
WEIGHTS_ARTIFACT = "weights"
SPEC_ARTIFACT = "rack_spec"
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "rack_spec.json"
TOKENIZER_FILE = "tokenizer.json"
PYFUNC_CODE = Path(__file__).with_name("rack_pyfunc.py")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws tqdm bars for every artifact transfer; they only clutter a run's output."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def save_rack_files(rack: Rack, folder: str | Path) -> tuple[Path, Path]:
    """Write ``weights.safetensors`` and ``rack_spec.json`` of `rack` into `folder`."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, spec = folder / WEIGHTS_FILE, folder / SPEC_FILE
    # save_model (not save_file) handles tensors shared by several names, e.g. a tied LM head.
    save_model(rack, str(weights))
    spec.write_text(json.dumps(rack.spec(), indent=2, sort_keys=True), encoding="utf-8")
    return weights, spec


def rack_from_files(weights: str | Path, spec: str | Path) -> Rack:
    """Rebuild a Rack from its spec JSON and load its safetensors weights (strictly)."""
    from safetensors.torch import load_model

    from stackwise.model.architecture import create_rack_from_specs

    rack_spec = json.loads(Path(spec).read_text(encoding="utf-8"))
    rack = create_rack_from_specs(**rack_spec)
    load_model(rack, str(weights), strict=True)
    rack.eval()
    return rack


def rack_signature(vocab_size: int) -> ModelSignature:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), "input_ids")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, vocab_size), "logits")]),
    )


def _requirements() -> list[str]:
    """Pinned from the running interpreter: cheaper and exacter than MLflow's inference."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "safetensors", "numpy", "mlflow", "stackwise"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_rack(
    rack: Rack,
    run_id: str,
    experiment_id: str,
    tracking_uri: str,
    tokenizer_json: str | None = None,
) -> str:
    """Log `rack` as the MLflow model ``model`` of run `run_id`; returns the model id."""
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="stackwise-model-") as temp:
        weights, spec = save_rack_files(rack, temp)
        artifacts = {WEIGHTS_ARTIFACT: str(weights), SPEC_ARTIFACT: str(spec)}
        if tokenizer_json is not None:
            tokenizer = Path(temp) / TOKENIZER_FILE
            tokenizer.write_text(tokenizer_json, encoding="utf-8")
            artifacts["tokenizer"] = str(tokenizer)
        with use_tracking_uri(tracking_uri), _no_progress_bars(), warnings.catch_warnings():
            # MLflow nags about type hints and input examples; the explicit signature covers it.
            warnings.simplefilter("ignore")
            mlflow.set_experiment(experiment_id=experiment_id)
            info = retry_locked(
                lambda: Model.log(
                    artifact_path=None,
                    name=MODEL_NAME,
                    flavor=mlflow.pyfunc,
                    run_id=run_id,
                    python_model=str(PYFUNC_CODE),
                    artifacts=artifacts,
                    signature=rack_signature(rack.vocab_size),
                    pip_requirements=_requirements(),
                ),
                what="log model",
            )
    return str(info.model_id)


def _model_of_run(client: MlflowClient, run_id: str) -> Any:
    """The LoggedModel named ``model`` that run `run_id` produced (the latest one)."""
    run = client.get_run(run_id)
    candidates = []
    outputs = getattr(run, "outputs", None)
    for output in getattr(outputs, "model_outputs", None) or []:
        candidates.append(client.get_logged_model(output.model_id))
    if not candidates:
        candidates = list(
            client.search_logged_models(
                [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
            )
        )
    named = [m for m in candidates if m.name == MODEL_NAME]
    if not named:
        raise LookupError(f"run {run_id} has no logged model named {MODEL_NAME!r}")
    return max(named, key=lambda m: m.creation_timestamp)


def load_rack(run_id: str, tracking_uri: str | None = None) -> Rack:
    """The Rack trained by run `run_id`, rebuilt from its spec and safetensors weights."""
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    model = _model_of_run(client, run_id)
    with (
        tempfile.TemporaryDirectory(prefix="stackwise-load-") as temp,
        use_tracking_uri(uri),
        _no_progress_bars(),
    ):
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=temp)
        )
        weights = next(local.rglob(WEIGHTS_FILE))
        spec = next(local.rglob(SPEC_FILE))
        return rack_from_files(weights, spec)
