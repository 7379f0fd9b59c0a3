"""flows/pipeline.py under Prefect's test harness (a temporary local Prefect API and database).

The flow drives a real, small DVC project in a temp folder (two chained stages whose commands
are one-line Python), so what is checked is the wiring: DVC's order, one task per stage, DVC's
own skipping on the second run, the markdown artifact, the MLflow parent run, and a failing
stage failing the flow.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from dynaplan import tracking

DVC_YAML = {
    "stages": {
        # Listed out of order on purpose: the flow must follow the graph, not the file.
        "second": {
            "cmd": "python -c \"import pathlib; pathlib.Path('b.txt').write_text(pathlib.Path('a.txt').read_text() + 'b')\"",
            "deps": ["a.txt"],
            "outs": ["b.txt"],
        },
        "first": {
            "cmd": "python -c \"import json, pathlib; pathlib.Path('a.txt').write_text('a'); pathlib.Path('m.json').write_text(json.dumps({'rows': 3}))\"",
            "outs": ["a.txt"],
            "metrics": [{"m.json": {"cache": False}}],
        },
    }
}


pytestmark = pytest.mark.e2e


@pytest.fixture
def harness(prefect_harness):
    return prefect_harness


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setenv(tracking.ROOT_ENV, str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
    return root


def _artifact_markdown(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return artifacts[0].data


def test_flow_runs_stages_in_dag_order_then_dvc_skips_them_and_a_report_is_published(harness, project, monkeypatch):
    import mlflow

    from flows.pipeline import ARTIFACT_KEY, pipeline

    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "flow-test-1")
    first = pipeline()
    assert [(r["stage"], r["outcome"]) for r in first] == [("first", "ran"), ("second", "ran")]
    assert (project / "b.txt").read_text() == "ab"
    assert first[0]["metrics"] == {"rows": 3}
    markdown = _artifact_markdown(ARTIFACT_KEY)
    assert "| first | ran |" in markdown and "| second | ran |" in markdown and "rows=3" in markdown

    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "flow-test-2")
    again = pipeline()
    assert [r["outcome"] for r in again] == ["unchanged", "unchanged"]
    parent = mlflow.get_run(tracking.pipeline_parent_run("flow-test-2"))
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_PIPELINE] == "flow-test-2"


def test_a_failing_stage_fails_the_flow_with_its_output(harness, project, monkeypatch):
    from flows.pipeline import StageFailed, pipeline

    broken = dict(DVC_YAML)
    broken["stages"] = {**DVC_YAML["stages"], "first": {**DVC_YAML["stages"]["first"], "cmd": "python -c \"raise SystemExit('boom: bad data')\""}}
    (project / "dvc.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "flow-test-fail")
    with pytest.raises(StageFailed, match="boom: bad data"):
        pipeline()
    assert not (project / "b.txt").exists()
