"""Static checks of what the team deploys: flows/prefect.yaml names real flows with parameters
they accept, on the right work pools; the work-pool templates and Kubernetes manifests request
GPUs where GPU stages run; params-paper.yaml merges into a valid paper-scale params file; the
GPU dispatch rule sends training and model evaluation to the gpu pool."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from flows import deployments, gpu
from flows.workspace import apply_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_deploys_pipeline_evaluate_promote_and_the_gpu_stage_flow():
    specs = {spec["name"]: spec for spec in deployments.deployment_specs()}
    assert {"pipeline", "evaluate", "promote", "gpu", "pipeline-paper"} <= set(specs)
    assert specs["pipeline"]["work_pool"]["name"] == "cpu"
    for name in ("gpu", "evaluate", "promote"):
        assert specs[name]["work_pool"]["name"] == "gpu", name
    assert gpu.GPU_DEPLOYMENT == "dynaplan-stage/gpu" and specs["gpu"]["entrypoint"] == "flows/gpu.py:stage_flow"


@pytest.mark.parametrize("name", ["pipeline", "pipeline-paper", "gpu", "evaluate", "promote"])
def test_each_entrypoint_is_a_flow_that_accepts_its_parameters(name):
    from prefect.flows import load_flow_from_entrypoint

    spec = next(s for s in deployments.deployment_specs() if s["name"] == name)
    path, _ = spec["entrypoint"].split(":")
    assert (ROOT / path).is_file()
    flow = load_flow_from_entrypoint(str(ROOT / spec["entrypoint"]))
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(spec.get("parameters") or {}) <= accepted, f"{name}: {set(spec['parameters']) - accepted}"


def test_pipeline_flow_takes_the_ui_parameters():
    from flows.pipeline import pipeline

    accepted = set(inspect.signature(pipeline.fn).parameters)
    assert {"stages", "overrides", "backend", "revision", "profile", "gpu_stages"} <= accepted
    from flows.evaluate import evaluate

    assert {"model", "episodes", "seed_start", "mode", "plans", "backend"} <= set(inspect.signature(evaluate.fn).parameters)


def test_work_pool_templates_are_process_templates_with_pool_defaults():
    for pool in ("cpu", "gpu"):
        template = json.loads((ROOT / "infra" / "prefect" / f"process-{pool}.json").read_text())
        assert set(template) == {"job_configuration", "variables"}
        assert template["job_configuration"]["env"] == "{{ env }}"
        assert template["variables"]["properties"]["env"]["default"]["DYNAPLAN_POOL"] == pool
    k8s = json.loads((ROOT / "infra" / "prefect" / "kubernetes-gpu.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"


def test_kubernetes_gpu_worker_requests_a_gpu_and_no_secret_is_committed():
    docs = [d for f in sorted((ROOT / "infra" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "worker-cpu"), ("Deployment", "worker-gpu"), ("Deployment", "vllm")} <= kinds
    assert not any(d["kind"] == "Secret" for d in docs)
    worker = next(d for d in docs if d["metadata"]["name"] == "worker-gpu")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--pool" in container["args"] and "gpu" in container["args"]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "vllm")
    assert service["spec"]["type"] == "ClusterIP"


def test_paper_profile_merges_into_valid_paper_scale_params():
    from dynaplan.config import parse_params

    raw = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load((ROOT / "params-paper.yaml").read_text()))
    params = parse_params(raw, "params.yaml + params-paper.yaml")
    assert params.model.base.endswith("Llama-3.1-8B-Instruct")
    assert params.prompt.history_len == 16
    assert params.envs.crafter.max_steps == 2000 and params.evaluate.crafter_max_steps == 2000
    assert params.evaluate.episodes == 100 and params.promote.episodes == 100


@pytest.mark.parametrize(("stage", "on_gpu"), [
    ("sft", True), ("ppo@dynamic", True), ("goldilocks@4", True), ("goldilocks_mode@never", True),
    ("best_of", True), ("best_of_human_plans", True), ("generate", False), ("validate", False),
    ("base_model", False), ("evaluate_baseline@expert-crafter", False), ("pareto", False), ("goldilocks_plot", False),
])
def test_gpu_dispatch_rule(stage, on_gpu):
    assert gpu.is_gpu_stage(stage, gpu.DEFAULT_GPU_STAGES) is on_gpu
