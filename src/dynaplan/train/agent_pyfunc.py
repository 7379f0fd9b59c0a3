"""MLflow models-from-code definition of a registered `dynaplan-agent` version (nothing pickled).

MLflow copies this file into the model and runs it at load time: the model is the base model
(its directory recorded in the model config, `DYNAPLAN_BASE_MODEL_DIR` overrides it) plus the
LoRA adapter logged as an artifact. `predict` answers chat prompts greedily through the hf
backend. It must stay importable without loading any weights (MLflow imports it when logging).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

BASE_DIR_ENV = "DYNAPLAN_BASE_MODEL_DIR"


class AgentModel(PythonModel):
    """Input: a column `messages` of JSON chat prompts (system + user). Output: the answers."""

    def load_context(self, context):
        from dynaplan.models.hf import HFBackend

        config = context.model_config or {}
        base_dir = os.environ.get(BASE_DIR_ENV) or config.get("base_model_dir")
        if not base_dir or not (Path(base_dir) / "config.json").is_file():
            raise FileNotFoundError(
                f"base model dir {base_dir!r} not found; set {BASE_DIR_ENV} to the base model "
                f"({config.get('base_model')!r}) this adapter was trained on"
            )
        from dynaplan.train.sft import check_adapter_base

        # Our own check (the base model's fingerprint), not the recorded path, which moves.
        check_adapter_base(context.artifacts["adapter"], base_dir)
        self.backend = HFBackend(base_dir, context.artifacts["adapter"], check_adapter_base=False)
        self.max_new_tokens = int(config.get("max_new_tokens", 96))

    def predict(self, context, model_input, params=None):
        from dynaplan.models.base import GenerationRequest, SamplingParams

        params = params or {}
        prompts = _prompts(model_input)
        sampling = SamplingParams(
            temperature=float(params.get("temperature", 0.0)),
            top_p=1.0,
            max_new_tokens=int(params.get("max_new_tokens", self.max_new_tokens)),
        )
        requests = [GenerationRequest(messages=prompt) for prompt in prompts]
        return [g.text for g in self.backend.generate(requests, sampling, seed=int(params.get("seed", 0)))]


def _prompts(model_input) -> list[list[dict]]:
    """Chat prompts from a DataFrame (one JSON prompt per row) or a dict `{"messages": [...]}`,
    which MLflow turns into one row holding the whole list."""
    if hasattr(model_input, "columns"):
        values = list(model_input["messages"])
    elif isinstance(model_input, dict):
        values = model_input["messages"]
        values = [values] if isinstance(values, str) else list(values)
    else:
        values = list(model_input)
    prompts: list[list[dict]] = []
    for value in values:
        if isinstance(value, str):
            prompts.append(json.loads(value))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            prompts.extend(json.loads(v) for v in value)
        else:
            prompts.append([dict(m) for m in value])
    return prompts


mlflow.models.set_model(AgentModel())
