"""The MLflow model definition of a trained Rack (logged as code, never pickled).

MLflow's "models from code": `stackwise.tracking.models.log_rack` hands MLflow this file's path,
MLflow copies the file into the model, and `mlflow.pyfunc.load_model` executes it to get the
model object. The weights travel as safetensors and the architecture as the rack's JSON spec, so
loading a logged Rack runs this reviewed code and reads plain tensors — nothing is unpickled.
Do not import this module elsewhere: executing it registers the model with MLflow.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class RackModel(PythonModel):
    """pyfunc wrapper: ``predict(input_ids [B, T] int64) -> logits [B, T, vocab] float32``."""

    # The input is described by the tensor signature the model is logged with; MLflow's
    # type-hint based validation (which wants list-shaped hints) is not used.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from stackwise.tracking.models import SPEC_ARTIFACT, WEIGHTS_ARTIFACT, rack_from_files

        self.rack = rack_from_files(
            context.artifacts[WEIGHTS_ARTIFACT], context.artifacts[SPEC_ARTIFACT]
        )
        self.rack.eval()

    # Unannotated on purpose: MLflow would derive a (list-shaped) input schema from type hints.
    def predict(self, context, model_input, params=None):
        import torch

        if isinstance(model_input, dict):
            model_input = model_input["input_ids"]
        if hasattr(model_input, "to_numpy"):  # a pandas DataFrame of token columns
            model_input = model_input.to_numpy()
        input_ids = torch.as_tensor(np.asarray(model_input, dtype=np.int64))
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        with torch.no_grad():
            logits = self.rack(input_ids)
        return logits.float().numpy()


mlflow.models.set_model(RackModel())
