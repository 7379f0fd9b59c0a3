"""The pure parts of the flows: DVC log parsing, stage ordering, model references, the report."""

from __future__ import annotations

import pytest

from flows import workspace as W
from flows.evaluate import model_uri
from flows.report import outcomes_markdown


def test_repro_output_names_what_dvc_did_with_each_stage():
    text = "\n".join([
        "Stage 'base_model' is cached - skipping run, checking out outputs",
        "Pulling data for stage: 'generate'",
        "Stage 'validate' didn't change, skipping",
        "Running stage 'sft':",
        "> python -m tasks.sft",
    ])
    assert W.parse_repro_output(text) == {"base_model": "restored", "generate": "restored", "validate": "unchanged", "sft": "ran"}


def test_stages_to_run_adds_upstream_and_follows_the_graph():
    graph = {"base_model": set(), "generate": {"base_model"}, "validate": {"generate", "base_model"},
             "sft": {"validate"}, "pareto": set()}
    assert W.stages_to_run(graph, ["validate"]) == ["base_model", "generate", "validate"]
    assert W.stages_to_run(graph, None)[-1] == "sft"
    with pytest.raises(W.WorkspaceError, match="unknown stage"):
        W.stages_to_run(graph, ["no_such_stage"])


def test_backend_choice_sets_every_model_backend_key():
    assert W.backend_overrides("vllm") == {"evaluate.backend": "vllm", "ppo.rollout_backend": "vllm"}
    assert W.backend_overrides(None) == {}


@pytest.mark.parametrize(("model", "uri"), [
    ("7", "models:/dynaplan-agent/7"),
    ("champion", "models:/dynaplan-agent@champion"),
    ("models:/dynaplan-agent@challenger", "models:/dynaplan-agent@challenger"),
    ("/models/Llama-3.3-70B-Instruct", "/models/Llama-3.3-70B-Instruct"),
])
def test_evaluate_accepts_versions_aliases_uris_and_dirs(model, uri):
    assert model_uri(model) == uri


def test_report_has_one_row_per_stage_with_pool_and_outcome(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    markdown = outcomes_markdown(
        "run", [{"stage": "generate", "pool": "cpu", "outcome": "ran", "seconds": 1.5, "metrics": {"episodes": 3}},
                {"stage": "sft", "pool": "gpu", "outcome": "restored", "seconds": 0.2}],
        pipeline_run_id=None, workspace="/runs/x", revision="abc", overrides={"ppo.plan_cost": 0.01},
    )
    assert "| generate | cpu | ran | 1.5 | episodes=3 |" in markdown
    assert "| sft | gpu | restored |" in markdown
    assert "`ppo.plan_cost=0.01`" in markdown
