"""The `promote` deployment: the registry gate (dynaplan.promotion) in its own working copy, so
the UI can promote a candidate after checking it against the champion on the same held-out seeds.

It wires `python -m tasks.promote` (the `promote` stage's command) and reports; the rule lives
in dynaplan.promotion.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import gpu
from flows import workspace as ws_lib
from flows.report import version_link

PROMOTE_FLOW = "dynaplan-promote"
ARTIFACT_KEY = "dynaplan-promotion"


@flow(name=PROMOTE_FLOW, log_prints=True)
def promote(
    candidate: str | None = None,
    margin_se: float | None = None,
    max_tokens_per_episode: float | None = None,
    episodes: int | None = None,
    evaluate_missing: bool | None = None,
    revision: str = "HEAD",
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare the `challenger` (or `candidate`, a version number that becomes the challenger)
    with the `champion` on the same held-out seeds; promote it if the progression gain exceeds
    `margin_se` paired standard errors within the token budget. The decision is a JSON record,
    tags on both versions and a markdown artifact; a refusal fails the run with its reason."""
    from dynaplan import tracking
    from dynaplan.promotion import CHALLENGER

    logger = get_run_logger()
    ws_lib.share_tracking()
    overrides = dict(overrides or {})
    for key, value in (("margin_se", margin_se), ("max_tokens_per_episode", max_tokens_per_episode),
                       ("episodes", episodes), ("evaluate_missing", evaluate_missing)):
        if value is not None:
            overrides[f"promote.{key}"] = value
    workspace = ws_lib.create_workspace(f"promote-{flow_run.get_id() or int(time.time())}", revision=revision,
                                        overrides=overrides, profile=profile)
    params = yaml.safe_load(workspace.params_file.read_text())
    model_name = params.get("promote", {}).get("model_name", "dynaplan-agent")
    if candidate is not None:
        tracking.set_alias(model_name, CHALLENGER, str(candidate))
        logger.info("version %s of %s is now the challenger", candidate, model_name)
    # The task itself, not `dvc repro promote`: the gate reads the registry, not the training
    # outputs the DVC stage waits for, so the UI can run it without the whole pipeline's outs.
    proc = ws_lib._run([sys.executable, "-m", "tasks.promote"], cwd=workspace.path, env=ws_lib.dvc_env(workspace.path), check=False)
    record_path = workspace.path / "reports" / "promote" / "decision.json"
    if proc.returncode != 0 or not record_path.is_file():
        create_markdown_artifact(markdown=f"# promotion refused\n\n```\n{(proc.stdout + proc.stderr)[-3000:]}\n```",
                                 key=ARTIFACT_KEY, description="promotion refused")
        raise RuntimeError(f"promotion refused or failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    record = json.loads(record_path.read_text())
    rows = [(k, record.get(k)) for k in (
        "outcome", "candidate_version", "champion_version", "candidate_progression", "champion_progression",
        "mean_difference", "paired_se", "threshold", "margin_se", "candidate_tokens_per_episode", "max_tokens_per_episode")]
    lines = [f"# promotion: {record['outcome']}", "", record["reason"], "", "| number | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"- seeds: {record['seeds'][0]}..{record['seeds'][-1]} ({len(record['seeds'])})"]
    if record.get("candidate_version"):
        lines.append(f"- candidate: {version_link(model_name, str(record['candidate_version']))}")
    if record.get("champion_version"):
        lines.append(f"- previous champion: {version_link(model_name, str(record['champion_version']))}")
    lines.append(f"- pool: {gpu.current_pool() or '-'}; working copy `{workspace.path}`")
    create_markdown_artifact(markdown="\n".join(lines), key=ARTIFACT_KEY, description=f"promotion: {record['outcome']}")
    return record
