"""A trained Rack as an MLflow model, and loading it back by run id.

Why a pyfunc model logged from code rather than ``mlflow.pytorch.log_model``: the PyTorch flavour
pickles the whole module, so loading it unpickles whatever the file holds and breaks when classes
move. Here the model is two plain files — ``weights.safetensors`` (tensors only; a tied LM head is
stored once) and ``rack_spec.json`` (``rack.spec()``, everything ``create_rack_from_specs`` needs)
— plus the reviewed `stackwise.tracking.rack_pyfunc` code that MLflow runs to serve it. The model
carries a signature (``input_ids`` int64 [B, T] -> ``logits`` float32 [B, T, vocab]).

`load_rack(run_id)` does not go through pyfunc at all: it downloads the two files and rebuilds the
Rack, which then gives the same logits as the trained one. It also takes a folder holding the two
files (``stackwise export --format safetensors`` writes one).

`load_trained(run_id | folder)` adds what generation needs besides the weights: the run's
tokenizer (a BPE is stored with the model as ``tokenizer.json``; byte runs need none), its
training objective and its resolved config (``config.yaml``). `open_trained` loads a run or
folder a user named, every way it can fail a one-line `TrainedModelError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackwise.tracking.store import resolve_tracking_uri, retry_locked, use_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.models import ModelSignature

    from stackwise.data.tokenizer import Tokenizer
    from stackwise.model.architecture import Rack

MODEL_NAME = "model"  # the name of a model logged without one (and of older runs' models)
TAG_MODEL = "stackwise.model"  # set to "rack" on every logged model of a trained rack
_MODEL_NAME_BAD = str.maketrans({c: "_" for c in "/:.%\"'"})  # what MLflow refuses in a name
WEIGHTS_ARTIFACT = "weights"
SPEC_ARTIFACT = "rack_spec"
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "rack_spec.json"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.yaml"  # the resolved config, as each grid-point run logs it
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
    """Rebuild a Rack from its spec JSON and load its safetensors weights (strictly). `weights`
    may also be the folder of a sharded rack (out-of-core runs), whose shards are mapped."""
    from safetensors.torch import load_model

    from stackwise.model.architecture import create_rack_from_specs, saved_rack_spec
    from stackwise.model.materialize import is_sharded_rack, load_sharded_rack

    if is_sharded_rack(weights):
        return load_sharded_rack(weights)

    rack_spec = json.loads(Path(spec).read_text(encoding="utf-8"))
    rack = create_rack_from_specs(**saved_rack_spec(rack_spec))
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
    weights_dir: str | Path | None = None,
    name: str | None = None,
    step: int = 0,
) -> str:
    """Log `rack` as an MLflow model of run `run_id`, named `name` (`model_name`; else
    ``model``) and linked to the run's metrics at `step` (its final step: the model carries
    the final results); returns the model id. With `weights_dir` (an out-of-core run's sharded
    rack) the shards are logged as they are."""
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="stackwise-model-") as temp:
        if weights_dir is None:
            weights, spec = save_rack_files(rack, temp)
        else:
            weights, spec = Path(weights_dir), Path(weights_dir) / SPEC_FILE
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
                    name=model_name(name) if name else MODEL_NAME,
                    flavor=mlflow.pyfunc,
                    tags={TAG_MODEL: "rack"},
                    step=step,
                    run_id=run_id,
                    python_model=str(PYFUNC_CODE),
                    artifacts=artifacts,
                    signature=rack_signature(rack.vocab_size),
                    pip_requirements=_requirements(),
                ),
                what="log model",
            )
    return str(info.model_id)


def model_name(title: str) -> str:
    """A run's display name as a logged model's name (MLflow refuses ``/ : . % " '``)."""
    return title.replace(" · ", "_").replace(" ", "_").translate(_MODEL_NAME_BAD) or MODEL_NAME


def _model_of_run(client: MlflowClient, run_id: str) -> Any:
    """The rack model that run `run_id` logged (tagged `TAG_MODEL`, or named ``model`` by an
    older version; the latest one)."""
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
    named = [m for m in candidates if m.tags.get(TAG_MODEL) == "rack" or m.name == MODEL_NAME]
    if not named:
        raise LookupError(f"run {run_id} has no logged rack model")
    return max(named, key=lambda m: m.creation_timestamp)


def has_logged_model(client: MlflowClient, run_id: str) -> bool:
    """Whether run `run_id` has logged its trained rack (the model ``model``)."""
    try:
        retry_locked(lambda: _model_of_run(client, run_id))
    except LookupError:
        return False
    return True


def retrain_command(file: str | Path | None, labels: Mapping[str, str]) -> str:
    """The command that trains one grid point again and logs its model: `--force` (it already
    finished), `--only` its axis labels, log_model on."""
    command = ["stackwise", "run", str(file or "<experiment file>"), "--force"]
    for key, value in labels.items():
        command += ["--only", f"{key}={value}"]
    command += ["--set", "tracking.log_model=true"]
    return shlex.join(command)


def _labels_of(run: Run) -> dict[str, str]:
    """A point run's axis labels (grid coordinates, tuned values, seed) from its tags."""
    from stackwise.tracking.logger import TAG_GRID_PREFIX, TAG_SEED, TAG_TUNE_PREFIX

    labels = {}
    for key, value in run.data.tags.items():
        for prefix in (TAG_GRID_PREFIX, TAG_TUNE_PREFIX):
            if key.startswith(prefix):
                labels[key.removeprefix(prefix)] = value
    if TAG_SEED in run.data.tags:
        labels["seed"] = run.data.tags[TAG_SEED]
    return labels


def missing_model_reason(client: MlflowClient, run: Run) -> str:
    """Why run `run` has no logged model, and what gives it one: the run is still RUNNING (wait
    for it), its process is gone or it was KILLED (resume it), it FAILED, it is a grid's parent
    run, or it trained with ``tracking.log_model: false``."""
    import yaml

    from stackwise.tracking.logger import TAG_ERROR, TAG_FILE, TAG_OWNER, TAG_ROLE
    from stackwise.tracking.store import owner_alive

    info, tags = run.info, run.data.tags
    file = tags.get(TAG_FILE)
    command = shlex.join(["stackwise", "run", file or "<experiment file>"])
    resume = f"run `{command}` again to resume it; its model is logged when it finishes"
    if tags.get(TAG_ROLE) == "grid":
        return (
            "it is the parent run of a grid, which has no model of its own; give the run id "
            "of one of its points (`stackwise compare` lists them)"
        )
    if info.status == "RUNNING":
        holder = tags.get(TAG_OWNER)
        if holder is not None and owner_alive(holder) is False:
            return (
                f"it is marked RUNNING but its process ({holder}) is gone: it was killed; {resume}"
            )
        where = f" (process {holder})" if holder else ""
        return (
            f"it is still RUNNING{where} and logs its model when it finishes: wait for it to finish"
        )
    if info.status == "KILLED":
        return f"it was KILLED before it finished; {resume}"
    if info.status == "FAILED":
        error = tags.get(TAG_ERROR, "see its error.txt")
        return f"it FAILED ({error.splitlines()[0] if error else 'no error recorded'})"
    log_model: Any = None
    with (
        contextlib.suppress(Exception),  # no config.yaml: an older or foreign run
        tempfile.TemporaryDirectory(prefix="stackwise-config-") as temp,
        _no_progress_bars(),
    ):
        config = client.download_artifacts(info.run_id, CONFIG_FILE, temp)
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        log_model = (data.get("tracking") or {}).get("log_model")
    if log_model is False:
        return (
            "it trained with tracking.log_model: false; to log one, train it again: "
            f"`{retrain_command(file, _labels_of(run))}`"
        )
    return "it has no logged rack model"


def _weights_in(local: Path) -> Path:
    """The weights of a downloaded model: one safetensors file, or a sharded rack's folder."""
    from stackwise.model.materialize import INDEX_FILE

    single = next(local.rglob(WEIGHTS_FILE), None)
    if single is not None:
        return single
    return next(local.rglob(INDEX_FILE)).parent


def load_rack(run_id: str, tracking_uri: str | None = None) -> Rack:
    """The Rack trained by run `run_id` (or saved in the folder `run_id`), rebuilt from its
    spec and safetensors weights."""
    import mlflow
    from mlflow import MlflowClient

    if Path(run_id).is_dir():
        folder = Path(run_id)
        return rack_from_files(folder / WEIGHTS_FILE, folder / SPEC_FILE)
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
        return rack_from_files(_weights_in(local), next(local.rglob(SPEC_FILE)))


# --------------------------------------------------------------------------------------------
# a trained model with what generation and export need
# --------------------------------------------------------------------------------------------


class TrainedModelError(ValueError):
    """A run or folder that cannot be loaded as a trained model (one line, for the user)."""


@dataclass
class TrainedModel:
    """A trained Rack with its tokenizer, objective and resolved config (when known)."""

    rack: Rack
    tokenizer: Tokenizer
    objective: str | None  # training.objective: clm, mlm or diffusion
    name: str  # the run's name, or the folder
    source: str  # run id or folder path
    config_yaml: str | None = None
    tokenizer_json: str | None = None  # a BPE's own JSON; None for the byte tokenizer
    seq_len: int | None = None


def _tokenizer_of(
    rack: Rack, tokenizer_json: str | None, kind: str | None, where: str
) -> Tokenizer:
    from stackwise.data.tokenizer import BPETokenizer, ByteTokenizer

    if tokenizer_json is not None:
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(tokenizer_json))
    if kind in ("bpe", "hf"):
        raise TrainedModelError(
            f"{where}: trained with a BPE tokenizer that is not stored with it "
            f"(no {TOKENIZER_FILE}); it cannot be decoded"
        )
    if rack.vocab_size < ByteTokenizer.vocab_size:
        raise TrainedModelError(
            f"{where}: vocabulary of {rack.vocab_size} ids, but no {TOKENIZER_FILE} and the byte "
            f"tokenizer needs {ByteTokenizer.vocab_size}"
        )
    return ByteTokenizer()


def _config_fields(config_yaml: str | None) -> dict[str, Any]:
    """objective, tokenizer kind and seq_len from a resolved config's YAML (if given)."""
    if config_yaml is None:
        return {}
    import yaml

    data = yaml.safe_load(config_yaml) or {}
    training, data_section = data.get("training") or {}, data.get("data") or {}
    return {
        "objective": training.get("objective"),
        "seq_len": training.get("seq_len"),
        "tokenizer": data_section.get("tokenizer"),
    }


def load_trained(source: str, tracking_uri: str | None = None) -> TrainedModel:
    """The model of run `source`, or of the folder `source` (``weights.safetensors``,
    ``rack_spec.json``, optional ``tokenizer.json`` and ``config.yaml``), with its tokenizer and
    training objective. Raises `TrainedModelError` (and MLflow's errors for a run the store
    does not have)."""
    folder = Path(source)
    if folder.is_dir():
        missing = [n for n in (WEIGHTS_FILE, SPEC_FILE) if not (folder / n).is_file()]
        if missing:
            raise TrainedModelError(f"{folder}: not a saved rack (no {', '.join(missing)})")
        rack = rack_from_files(folder / WEIGHTS_FILE, folder / SPEC_FILE)
        tokenizer_path, config_path = folder / TOKENIZER_FILE, folder / CONFIG_FILE
        tokenizer_json = (
            tokenizer_path.read_text(encoding="utf-8") if tokenizer_path.is_file() else None
        )
        config_yaml = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
        fields = _config_fields(config_yaml)
        return TrainedModel(
            rack=rack,
            tokenizer=_tokenizer_of(rack, tokenizer_json, fields.get("tokenizer"), str(folder)),
            objective=fields.get("objective"),
            name=folder.name,
            source=str(folder),
            config_yaml=config_yaml,
            tokenizer_json=tokenizer_json,
            seq_len=fields.get("seq_len"),
        )
    return _load_trained_run(source, resolve_tracking_uri(tracking_uri))


def open_trained(source: str, tracking_uri: str | None = None) -> TrainedModel:
    """`load_trained` of a run id or folder a user named: a run is looked up only in a store
    that exists and can be used, and every way it can fail is a `TrainedModelError` of one
    line."""
    from mlflow.exceptions import MlflowException

    from stackwise.tracking.store import check_tracking_uri, sqlite_path

    if Path(source).is_dir():
        try:
            return load_trained(source)
        except TrainedModelError:
            raise
        except (OSError, ValueError) as error:
            raise TrainedModelError(str(error)) from error
    uri = resolve_tracking_uri(tracking_uri)
    database = sqlite_path(uri)
    if database is not None and not database.exists():
        raise TrainedModelError(
            f"{source}: not a folder, and there is no tracking store at {database} to find it in"
        )
    problem = check_tracking_uri(uri)
    if problem is not None:
        raise TrainedModelError(problem)
    try:
        return load_trained(source, tracking_uri=uri)
    except MlflowException as error:
        first = error.message.splitlines()[0]
        raise TrainedModelError(
            f"{source}: not a folder, and not a run of {uri} ({first})"
        ) from None


def _load_trained_run(run_id: str, uri: str) -> TrainedModel:
    import mlflow
    from mlflow import MlflowClient

    from stackwise.tracking.logger import TAG_RUN_NAME

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    try:
        model = _model_of_run(client, run_id)
    except LookupError:
        name = run.data.tags.get(TAG_RUN_NAME) or run.info.run_name
        label = f"run {run_id}" + (f" ({name})" if name and name != run_id else "")
        reason = missing_model_reason(client, run)
        raise TrainedModelError(f"{label} has no logged model: {reason}") from None
    with (
        tempfile.TemporaryDirectory(prefix="stackwise-load-") as temp,
        use_tracking_uri(uri),
        _no_progress_bars(),
    ):
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=temp)
        )
        rack = rack_from_files(_weights_in(local), next(local.rglob(SPEC_FILE)))
        tokenizer_file = next(local.rglob(TOKENIZER_FILE), None)
        tokenizer_json = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file else None
        config_yaml = None
        names = {a.path for a in client.list_artifacts(run_id)}
        if CONFIG_FILE in names:
            config = client.download_artifacts(run_id, CONFIG_FILE, temp)
            config_yaml = Path(config).read_text(encoding="utf-8")
    params = run.data.params
    seq_len = params.get("training.seq_len")
    name = run.data.tags.get(TAG_RUN_NAME) or run.info.run_name or run_id
    return TrainedModel(
        rack=rack,
        tokenizer=_tokenizer_of(rack, tokenizer_json, params.get("data.tokenizer"), f"run {name}"),
        objective=params.get("training.objective"),
        name=name,
        source=run_id,
        config_yaml=_with_vocab_size(config_yaml, rack.vocab_size),
        tokenizer_json=tokenizer_json,
        seq_len=int(seq_len) if seq_len and seq_len.isdigit() else None,
    )


def _with_vocab_size(config_yaml: str | None, vocab_size: int) -> str | None:
    """The logged config has ``model.vocab_size: null`` when the tokenizer decided it; the
    rack knows the value."""
    if config_yaml is None:
        return None
    import yaml

    data = yaml.safe_load(config_yaml) or {}
    model = data.get("model")
    if isinstance(model, dict) and model.get("vocab_size") is None:
        model["vocab_size"] = vocab_size
        return str(yaml.safe_dump(data, sort_keys=False))
    return config_yaml
