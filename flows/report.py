"""Prefect artifacts for a flow run: where each stage ran and what it did, the metrics, and links
to the MLflow runs and registered model versions it produced. Reads MLflow; writes nothing there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


def _ui_base() -> str | None:
    """The MLflow web UI behind the tracking URI (None for a file or SQLite store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def run_link(experiment_id: str, run_id: str, label: str) -> str:
    base = _ui_base()
    return f"[{label}]({base}/#/experiments/{experiment_id}/runs/{run_id})" if base else f"{label} (`{run_id}`)"


def version_link(name: str, version: str) -> str:
    base = _ui_base()
    return f"[{name} v{version}]({base}/#/models/{name}/versions/{version})" if base else f"{name} v{version}"


def pipeline_mlflow_records(pipeline_run_id: str) -> tuple[list[Any], list[Any]]:
    """The MLflow runs tagged with this pipeline run id, and the model versions they registered."""
    from dynaplan import tracking

    mlflow = tracking._mlflow()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        return [], []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tracking.TAG_PIPELINE}` = '{pipeline_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=500,
    )
    run_ids = [run.info.run_id for run in runs]
    versions: list[Any] = []
    if run_ids:
        quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
        try:
            versions = list(client.search_model_versions(f"run_id IN ({quoted})"))
        except Exception:  # a store without the registry: the runs are still worth listing
            versions = []
    return runs, versions


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def outcomes_markdown(
    title: str,
    outcomes: Sequence[Mapping[str, Any]],
    *,
    pipeline_run_id: str | None,
    workspace: str | None,
    revision: str | None,
    overrides: Mapping[str, Any] | None,
    failure: str | None = None,
) -> str:
    """The flow run's summary: one row per stage (pool, outcome, seconds, metrics), the params
    overrides, and links to the MLflow runs and model versions of this pipeline run."""
    lines = [f"# {title}", ""]
    if revision:
        lines.append(f"- git revision: `{revision}`")
    if workspace:
        lines.append(f"- working copy: `{workspace}`")
    if overrides:
        lines.append("- params overrides: " + ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()))
    lines += ["", "| stage | pool | outcome | seconds | metrics |", "|---|---|---|---|---|"]
    for row in outcomes:
        metrics = row.get("metrics") or {}
        shown = ", ".join(f"{k}={_cell(v)}" for k, v in list(metrics.items())[:8])
        lines.append(
            f"| {row['stage']} | {row.get('pool') or '-'} | {row['outcome']} | {_cell(row.get('seconds', ''))} | {shown} |"
        )
    if pipeline_run_id:
        try:
            runs, versions = pipeline_mlflow_records(pipeline_run_id)
        except Exception as err:  # the report must not fail a finished pipeline
            runs, versions = [], []
            lines += ["", f"(MLflow not reachable for links: {type(err).__name__}: {err})"]
        if runs:
            lines += ["", "## MLflow runs", ""]
            for run in runs:
                label = run.info.run_name or run.info.run_id
                lines.append(f"- {run_link(run.info.experiment_id, run.info.run_id, label)}")
        if versions:
            lines += ["", "## Registered model versions", ""]
            for version in versions:
                stage = (version.tags or {}).get("stage", "")
                lines.append(f"- {version_link(version.name, str(version.version))} {stage}".rstrip())
    if failure:
        lines += ["", "## Failed", "", "```", failure[-3000:], "```"]
    return "\n".join(lines)
