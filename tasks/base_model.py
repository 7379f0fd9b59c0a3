"""DVC stage `base_model`: materialise `model.base` (the embedded SmolLM2 GGUF or a local HF dir)
into `model.dir` as safetensors + tokenizer + chat template, and write its manifest metric.

Thin: reads params, calls dynaplan.models.materialize, logs to MLflow. No model logic here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dynaplan.config import load_params, usage_errors_exit_2
from dynaplan.models.materialize import ModelSourceError, materialize_base, source_sha256
from dynaplan.tracking import log_metrics, stage_run

MANIFEST_METRIC = Path("models/base_manifest.json")


@usage_errors_exit_2(ModelSourceError)
def main() -> int:
    params = load_params()
    section = {"model.base": params.model.base, "model.dir": params.model.dir}
    source_sha256(params.model.base)  # a bad source is a usage error, before any MLflow run
    with stage_run("base_model", section):
        manifest = materialize_base(params.model.base, params.model.dir)
        MANIFEST_METRIC.parent.mkdir(parents=True, exist_ok=True)
        tmp = MANIFEST_METRIC.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, MANIFEST_METRIC)
        log_metrics({"param_count": manifest["param_count"]})
    print(f"base model {manifest['source']} -> {params.model.dir} ({manifest['param_count']:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
