"""`dynaplan evaluate` and `dynaplan replay` end to end with the tiny real model and MLflow on SQLite."""

import json

import pytest
from typer.testing import CliRunner

from dynaplan.cli import app


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DYNAPLAN_ROOT", str(tmp_path))
    (tmp_path / "params.yaml").write_text("evaluate:\n  max_new_tokens: 10\n  temperature: 1.0\n")
    return tmp_path


def test_evaluate_every_k_with_tiny_model_logs_to_mlflow_and_replays(project, tiny_model_dir):
    runner = CliRunner()
    result = runner.invoke(app, [
        "evaluate", "--policy", "model", "--model", str(tiny_model_dir), "--env", "crafter",
        "--mode", "every_k", "--k", "2", "--episodes", "1", "--max-steps", "5", "--name", "tiny-every-2",
    ])
    assert result.exit_code == 0, result.output
    out = project / "reports/eval/tiny-every-2"
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    # every_k plans exactly at steps 0, 2, 4, and each plan's tokens are counted
    assert [s["step"] for s in steps if s["planned"]] == [0, 2, 4]
    assert all(s["plan_tokens"] > 0 for s in steps if s["planned"])
    assert metrics["plan_rate"] == pytest.approx(3 / 5)
    assert metrics["generated_tokens"] >= metrics["plan_tokens"] > 0
    assert 0.0 <= metrics["invalid_rate"] <= 1.0

    import mlflow

    runs = mlflow.search_runs(experiment_names=["dynaplan"], filter_string="tags.evaluation = 'tiny-every-2'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.plan_rate"] == pytest.approx(3 / 5)

    gif = project / "replay.html"
    replayed = runner.invoke(app, ["replay", f"{out}#crafter-1000000-a0", "--out", str(gif)])
    assert replayed.exit_code == 0, replayed.output
    assert gif.read_text().count("data:image/png;base64,") == 6  # reset + 5 steps


def test_evaluate_rejects_bad_options_with_exit_code_2(project):
    runner = CliRunner()
    assert runner.invoke(app, ["evaluate", "--policy", "nonsense", "--no-track"]).exit_code == 2
    assert runner.invoke(app, ["evaluate", "--policy", "model", "--model", "no/such/dir", "--no-track"]).exit_code == 2
    (project / "params.yaml").write_text("evaluate:\n  episodes: 0\n")
    bad = runner.invoke(app, ["evaluate", "--policy", "random", "--no-track"])
    assert bad.exit_code == 2 and "evaluate.episodes" in bad.output


def test_the_stage_caps_a_baseline_at_max_steps_on_the_sft_seeds(project):
    """`evaluate_random_capped`: the random agent on evaluate.sft_episodes seeds, capped at
    evaluate.sft_max_steps, so it compares with the capped SFT evaluations."""
    from tasks import evaluate as evaluate_task

    (project / "params.yaml").write_text("evaluate:\n  sft_episodes: 2\n  sft_max_steps: 3\n")
    code = evaluate_task.main(["--name", "random-capped", "--policy", "random", "--env", "crafter",
                               "--episodes", "2", "--max-steps", "3"])
    assert code == 0
    metrics = json.loads((project / "reports/eval/random-capped/metrics.json").read_text())
    assert metrics["config"]["max_steps"] == 3 and metrics["episodes"] == 2 and metrics["length"] == 3
