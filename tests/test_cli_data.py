"""`dynaplan generate` / `dynaplan validate`: exit 2 on bad params or a missing dataset, before work."""

from __future__ import annotations

from typer.testing import CliRunner

from dynaplan.cli import app


def test_generate_with_a_bad_param_exits_2_naming_the_key_and_writes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("generate:\n  plan_interval_min: 9\n  plan_interval_max: 3\n")
    result = CliRunner().invoke(app, ["generate", "--params", str(params), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "plan_interval_min=9" in result.output and "plan_interval_max=3" in result.output
    assert not (tmp_path / "out").exists()


def test_validate_without_a_dataset_exits_2_saying_what_to_run(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("validate:\n  plan_min_chars: 8\n")
    result = CliRunner().invoke(app, ["validate", "--params", str(params), "--data", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "generate stage" in result.output
