"""GPU dispatch: the stages that need an accelerator run as a `dynaplan-stage` flow on a worker
of the `gpu` work pool, in that worker's own working copy, moving data only through the DVC
remote (`dvc repro --pull` in, `dvc push --run-cache` out).

It decides where a stage runs and waits for it; it never runs stage code in-process.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import flow, get_run_logger

try:  # run as `flows.gpu` (package import) or by Prefect from the file path
    from flows import workspace as ws_lib
except ImportError:  # pragma: no cover - Prefect loads entrypoints with flows/ on sys.path
    import workspace as ws_lib  # type: ignore[no-redef]

CPU_POOL = "cpu"
GPU_POOL = "gpu"
STAGE_FLOW = "dynaplan-stage"
GPU_DEPLOYMENT = f"{STAGE_FLOW}/gpu"
# Stage-name patterns (fnmatch) that need a GPU: training and evaluating a model. The scripted
# baselines (evaluate_expert_*, evaluate_random_*) and data stages stay on the CPU pool.
DEFAULT_GPU_STAGES: tuple[str, ...] = (
    "sft", "sft@*", "ppo", "ppo@*", "goldilocks@*", "goldilocks_mode@*", "best_of", "best_of_human_plans", "evaluate_model*",
)
OUTCOMES_ARTIFACT = "stage-outcomes"


def is_gpu_stage(stage: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(stage, pattern) for pattern in patterns)


def current_pool() -> str | None:
    """The work pool of the worker running this flow run (None outside a deployment run);
    works inside the flow's tasks too."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run = getattr(context, "flow_run", None)
    return getattr(flow_run, "work_pool_name", None)


def run_stages_here(
    workspace: ws_lib.Workspace,
    stages: Sequence[str],
    *,
    pipeline_run_id: str | None,
) -> list[dict[str, Any]]:
    """`dvc repro --pull --single-item` each stage and what it needs in this working copy."""
    pool = current_pool()
    extra = {ws_lib.PIPELINE_RUN_ENV: pipeline_run_id} if pipeline_run_id else {}
    outcomes: list[dict[str, Any]] = []
    # upstream first, one stage at a time: each is checked out (its lock entry came from the
    # caller or the pool) before the next one's deps are compared with pooled entries
    for stage in ws_lib.stages_to_run(ws_lib.stage_graph(workspace.path), stages):
        started = time.monotonic()
        ws_lib.seed_lock_from_pool(workspace, stage)
        touched = ws_lib.repro(workspace, stage, extra_env=extra)
        ws_lib.remember_lock(workspace, stage)
        outcome = touched.get(stage, "unchanged")
        outcomes.append(ws_lib.StageOutcome(stage, outcome, round(time.monotonic() - started, 2), pool).as_dict())
    return outcomes


@flow(name=STAGE_FLOW, log_prints=True)
def stage_flow(
    stages: list[str],
    revision: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    repo: str | None = None,
    pipeline_run_id: str | None = None,
    lock: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run DVC stages in this worker's own working copy at `revision`: inputs come from the
    shared remote (`dvc repro --pull`: upstream stages are checked out or restored, not
    recomputed; `lock` is the caller's dvc.lock entries, which name them), outputs and the run
    cache go back to it (`dvc push --run-cache`). Deployed on the `gpu` pool. Each outcome row
    carries the stage's dvc.lock entry (JSON) for the caller's copy."""
    from prefect.artifacts import create_table_artifact
    from prefect.runtime import flow_run

    logger = get_run_logger()
    ws_lib.share_tracking()
    name = f"{pipeline_run_id or 'stage'}-{flow_run.get_id() or 'local'}"
    workspace = ws_lib.create_workspace(name, revision=revision, overrides=overrides or {}, profile=profile, repo=repo)
    logger.info("working copy %s at %s (remote %s)", workspace.path, workspace.revision[:12], workspace.remote)
    if lock:
        ws_lib.write_lock_entries(workspace.path, lock)
    outcomes = run_stages_here(workspace, stages, pipeline_run_id=pipeline_run_id)
    ws_lib.push(workspace)
    entries = ws_lib.read_lock(workspace.path)
    for row in outcomes:
        row["lock"] = json.dumps(entries.get(row["stage"]))
    create_table_artifact(outcomes, key=OUTCOMES_ARTIFACT, description=f"stages {', '.join(stages)} in {workspace.path}")
    return outcomes


def _outcomes_of(flow_run_id) -> list[dict[str, Any]]:
    """The outcome table a `stage_flow` run published (artifacts travel through the API, so
    this works when the GPU worker is another machine)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[OUTCOMES_ARTIFACT])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    if not found:
        return []
    data = found[0].data
    return json.loads(data) if isinstance(data, str) else list(data)


def dispatch_to_gpu(
    stages: Sequence[str],
    *,
    revision: str,
    overrides: Mapping[str, Any],
    profile: str | None,
    pipeline_run_id: str | None,
    lock: Mapping[str, Any] | None = None,
    deployment: str = GPU_DEPLOYMENT,
) -> list[dict[str, Any]]:
    """Run `stages` on the GPU pool with `run_deployment` (a subflow of the caller) and wait;
    raises if that run did not complete. Returns its outcome rows (with dvc.lock entries)."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        deployment,
        parameters={
            "stages": list(stages), "revision": revision, "overrides": dict(overrides), "profile": profile,
            "repo": os.environ.get(ws_lib.REPO_ENV), "pipeline_run_id": pipeline_run_id,
            "lock": dict(lock or {}),
        },
        timeout=None,
        poll_interval=2,
    )
    if flow_run.state is None or not flow_run.state.is_completed():
        state = flow_run.state.name if flow_run.state else "unknown"
        raise RuntimeError(f"GPU stages {list(stages)} ended {state} (flow run {flow_run.id} on {deployment})")
    rows = _outcomes_of(flow_run.id)
    for row in rows:
        row["lock"] = json.loads(row["lock"]) if isinstance(row.get("lock"), str) else row.get("lock")
    return rows
