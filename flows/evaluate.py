"""The `evaluate` deployment: evaluate a registered agent version (a number or an alias such as
`champion`) on held-out seeds, in its own working copy, on the `gpu` pool; results as artifacts.

It wires `dynaplan evaluate` into a working copy; scoring lives in dynaplan.eval.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import gpu
from flows import workspace as ws_lib
from flows.report import outcomes_markdown, run_link, version_link

EVALUATE_FLOW = "dynaplan-evaluate"
ARTIFACT_KEY = "dynaplan-evaluation"


def model_uri(model: str, name: str = "dynaplan-agent") -> str:
    """`3` -> models:/dynaplan-agent/3, `champion` -> models:/dynaplan-agent@champion; a full
    models:/ URI or a directory passes through."""
    if model.startswith("models:/") or "/" in model:
        return model
    return f"models:/{name}/{model}" if model.isdigit() else f"models:/{name}@{model}"


@flow(name=EVALUATE_FLOW, log_prints=True)
def evaluate(
    model: str = "champion",
    env: str | None = None,
    episodes: int | None = None,
    seed_start: int | None = None,
    mode: str | None = None,
    k: int | None = None,
    plans: str | None = None,
    best_of: int | None = None,
    backend: str | None = None,
    base_url: str | None = None,
    revision: str = "HEAD",
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (a version, an alias or a models:/ URI) with planning `mode` (dynamic,
    every_k, never, always) and optionally a human `plans` file, on `episodes` held-out seeds
    from `seed_start` (default: params' seeds.eval_start). With `backend="openai"` the model is
    served by `vllm serve` at `base_url` (default $DYNAPLAN_OPENAI_BASE_URL): the 70B zero-shot
    agent of the paper-scale profile, named by its local model dir in `model`."""
    logger = get_run_logger()
    ws_lib.share_tracking()
    overrides = {**ws_lib.backend_overrides(backend), **dict(overrides or {})}
    if seed_start is not None:
        overrides["seeds.eval_start"] = seed_start
    name = f"evaluate-{flow_run.get_id() or int(time.time())}"
    workspace = ws_lib.create_workspace(name, revision=revision, overrides=overrides, profile=profile)
    uri = model_uri(model)
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{uri.removeprefix('models:/')}-{mode or 'default'}")
    if backend == "openai" and base_url is None:
        base_url = os.environ.get("DYNAPLAN_OPENAI_BASE_URL")
    args = ["--name", label, "--policy", "model", "--model", uri]
    for flag, value in (("--env", env), ("--mode", mode), ("--k", k), ("--plans", plans), ("--best-of", best_of),
                        ("--episodes", episodes), ("--base-url", base_url)):
        if value is not None:
            args += [flag, str(value)]
    started = time.monotonic()
    ws_lib._run([sys.executable, "-m", "dynaplan.cli", "evaluate", *args], cwd=workspace.path, env=ws_lib.dvc_env(workspace.path))
    seconds = round(time.monotonic() - started, 1)
    out_dir = workspace.path / "reports" / "eval" / label
    metrics = json.loads((out_dir / "metrics.json").read_text())
    logger.info("evaluation %s: %s", label, {k: metrics.get(k) for k in ("progression", "generated_tokens")})
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    markdown = outcomes_markdown(
        f"evaluation of `{uri}`", [{"stage": "evaluate", "pool": gpu.current_pool(), "outcome": "ran", "seconds": seconds, "metrics": scalars}],
        pipeline_run_id=None, workspace=str(workspace.path), revision=workspace.revision, overrides=overrides,
    )
    markdown += "\n\n" + _links(uri, label)
    plots = sorted(p.name for p in (out_dir / "plots").glob("*.png")) if (out_dir / "plots").is_dir() else []
    if plots:
        markdown += "\n\nPlots (MLflow artifacts `eval/" + label + "/plots/`): " + ", ".join(plots)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description=f"evaluation of {uri}")
    return {"model": uri, "metrics": scalars, "out_dir": str(out_dir)}


def _links(uri: str, label: str) -> str:
    """Links to the MLflow run that logged this evaluation and to the version it evaluated."""
    from dynaplan import tracking

    lines = []
    try:
        client = tracking._mlflow().MlflowClient()
        experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.evaluation = '{label}'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if experiment else []
        if runs:
            lines.append("- MLflow run: " + run_link(experiment.experiment_id, runs[0].info.run_id, runs[0].info.run_name or label))
        if uri.startswith("models:/"):
            name, _, ref = uri.removeprefix("models:/").partition("@")
            if ref:
                version = tracking.version_for_alias(name, ref)
            else:
                name, _, version = uri.removeprefix("models:/").partition("/")
            if version:
                lines.append("- model version: " + version_link(name, str(version)))
    except Exception as err:  # links are a convenience; the evaluation itself succeeded
        lines.append(f"- (MLflow links unavailable: {type(err).__name__}: {err})")
    return "\n".join(lines)
