"""The dynaplan pipeline as a Prefect flow: one task per DVC stage, each `dvc repro --single-item`.

DVC stays the one source of caching and lineage (an unchanged stage is skipped by DVC, not by
us); the flow only orders the stages as `dvc dag` does, runs them in the project checkout, groups
their MLflow runs under one parent run and publishes a markdown artifact with the results.
Run it with `python -m flows.pipeline [--stage NAME ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from dynaplan import tracking
from flows import gpu
from flows import workspace as ws_lib
from flows.report import outcomes_markdown
from flows.workspace import parse_repro_output, stage_graph, stages_to_run

ARTIFACT_KEY = "dynaplan-pipeline"
_LOG_TAIL_LINES = 60


class StageFailed(RuntimeError):
    """A stage's `dvc repro` exited non-zero; the message holds the tail of its output."""


def stage_metrics(root: Path, stage: str) -> dict[str, Any]:
    """The scalar values of the metrics files that dvc.yaml declares for `stage`, flattened."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    values: dict[str, Any] = {}
    for entry in (stages.get(stage) or {}).get("metrics", []):
        path = root / (entry if isinstance(entry, str) else next(iter(entry)))
        if path.suffix == ".json" and path.is_file():
            for key, value in tracking.flatten(json.loads(path.read_text())).items():
                if isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 24):
                    values[key] = value
    return values


@task(task_run_name="{stage}")
def run_stage(stage: str, root: str, pipeline_run_id: str, working_copy: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` in the checkout (in a per-run working copy: with
    `--pull`, so a stage whose lock entry matches comes out of the shared cache or remote);
    raises StageFailed with its output."""
    logger = get_run_logger()
    env = ws_lib.dvc_env(Path(root)) if working_copy else dict(os.environ)
    env[tracking.PIPELINE_RUN_ENV] = pipeline_run_id
    # Stage commands say `python -m tasks.<stage>`: this interpreter's venv comes first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    started = time.perf_counter()
    pull = ["--pull"] if working_copy else []
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", *pull, "--single-item", stage],
        cwd=root, env=env, capture_output=True, text=True,
    )
    seconds = round(time.perf_counter() - started, 1)
    output = (proc.stdout + proc.stderr).strip()
    tail = "\n".join(output.splitlines()[-_LOG_TAIL_LINES:])
    if proc.returncode != 0:
        logger.error("stage %s failed (exit %s) after %ss:\n%s", stage, proc.returncode, seconds, tail)
        raise StageFailed(f"stage {stage!r} failed (dvc repro exit {proc.returncode}):\n{tail}")
    outcome = parse_repro_output(output).get(stage, "ran")
    logger.info("stage %s: %s in %ss\n%s", stage, outcome, seconds, tail)
    return {"stage": stage, "outcome": outcome, "seconds": seconds, "pool": gpu.current_pool(),
            "metrics": stage_metrics(Path(root), stage)}


def report_markdown(results: list[dict[str, Any]], pipeline_run_id: str, mlflow_run_id: str | None, failure: str | None) -> str:
    lines = [f"# dynaplan pipeline `{pipeline_run_id}`", ""]
    lines.append(f"MLflow: `{tracking.tracking_uri()}`, parent run `{mlflow_run_id}` (experiment `{tracking.EXPERIMENT}`)")
    lines += ["", "| stage | outcome | seconds | metrics |", "|---|---|---|---|"]
    for result in results:
        metrics = ", ".join(f"{k}={v}" for k, v in list(result["metrics"].items())[:8])
        lines.append(f"| {result['stage']} | {result['outcome']} | {result['seconds']} | {metrics} |")
    if failure:
        lines += ["", "## Failed", "", "```", failure[-3000:], "```"]
    return "\n".join(lines)


@flow(name="dynaplan-pipeline")
def pipeline(
    stages: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    backend: str | None = None,
    profile: str | None = None,
    revision: str = "HEAD",
    gpu_stages: list[str] | None = None,
    working_copy: bool | None = None,
) -> list[dict[str, Any]]:
    """Run the DVC stages (all, or `stages` and what they need) in order, one task each.

    From a deployment (the Prefect UI's Run button) the run works in its own clone of the
    repository at `revision` with `profile` (e.g. params-paper.yaml) and `overrides`
    (`{"ppo.plan_cost": 0.01}`) applied to its params.yaml, `backend` (hf | openai | vllm) set
    for every model stage; stages matching `gpu_stages` (default: flows.gpu.DEFAULT_GPU_STAGES)
    go to the `gpu` work pool. Called directly (`python -m flows.pipeline`), it runs in place in
    the checkout like `dvc repro`, unless `working_copy=True`."""
    from prefect.runtime import deployment

    pipeline_run_id = os.environ.get(tracking.PIPELINE_RUN_ENV) or str(flow_run.id or int(time.time()))
    overrides = {**ws_lib.backend_overrides(backend), **dict(overrides or {})}
    use_copy = working_copy if working_copy is not None else deployment.id is not None
    if not use_copy and (overrides or profile or revision != "HEAD"):
        raise ValueError("overrides, profile and revision need a working copy (working_copy=True or a deployment run)")
    workspace = None
    if use_copy:
        ws_lib.share_tracking()
        workspace = ws_lib.create_workspace(pipeline_run_id, revision=revision, overrides=overrides, profile=profile)
        root = workspace.path
    else:
        root = tracking.project_root()
    gpu_patterns = list(gpu_stages) if gpu_stages is not None else list(gpu.DEFAULT_GPU_STAGES)
    order = stages_to_run(stage_graph(root), stages)
    parent = tracking.pipeline_parent_run(pipeline_run_id)
    results: list[dict[str, Any]] = []
    failure: str | None = None
    try:
        for stage in order:
            if workspace is not None and gpu.is_gpu_stage(stage, gpu_patterns):
                rows = gpu.dispatch_to_gpu(
                    [stage], revision=workspace.revision, overrides=overrides, profile=profile,
                    pipeline_run_id=pipeline_run_id, lock=ws_lib.read_lock(root),
                )
                remote = {row["stage"]: row for row in rows}
                # the run cache (pulled by --pull) restores a cacheable stage with all its outs;
                # a stage it skips (persist outs) is named by the GPU copy's lock entry instead
                if remote.get(stage, {}).get("lock") and ws_lib.skipped_by_run_cache(root, stage):
                    ws_lib.write_lock_entries(root, {stage: remote[stage]["lock"]})
                # the GPU run's outputs come into this copy from the cache or remote (never rerun here)
                local = run_stage(stage, str(root), pipeline_run_id, working_copy=True)
                done = remote.get(stage, {})
                results.append({**local, "outcome": done.get("outcome", local["outcome"]),
                                "seconds": done.get("seconds", local["seconds"]), "pool": done.get("pool", gpu.GPU_POOL)})
                continue
            if workspace is not None:
                ws_lib.seed_lock_from_pool(workspace, stage)
            results.append(run_stage(stage, str(root), pipeline_run_id, working_copy=workspace is not None))
            if workspace is not None:
                ws_lib.remember_lock(workspace, stage)
                ws_lib.push(workspace, [stage])
    except Exception as err:  # any failure marks the MLflow parent run FAILED and is in the report
        failure = f"{type(err).__name__}: {err}" if not isinstance(err, StageFailed) else str(err)
        raise
    finally:
        status = "FAILED" if failure else "FINISHED"
        tracking.finish_pipeline_run(pipeline_run_id, status)
        if workspace is None:
            markdown = report_markdown(results, pipeline_run_id, parent, failure)
        else:
            markdown = outcomes_markdown(
                f"dynaplan pipeline `{pipeline_run_id}`", results, pipeline_run_id=pipeline_run_id,
                workspace=str(workspace.path), revision=workspace.revision, overrides=overrides, failure=failure,
            )
        create_markdown_artifact(
            markdown=markdown,
            key=ARTIFACT_KEY,
            description=f"dynaplan pipeline {pipeline_run_id}: {status.lower()}",
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the dynaplan DVC pipeline as a Prefect flow.")
    parser.add_argument("--stage", action="append", help="run this stage and what it needs (repeatable; default: all)")
    args = parser.parse_args(argv)
    try:
        pipeline(stages=args.stage)
    except StageFailed as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
