"""The base_model DVC stage script: params in, models/base + manifest metric out, exit 2 on a bad
source (run in-process in a scratch project dir, MLflow on SQLite via the isolated_mlflow fixture)."""

from __future__ import annotations

import json

import yaml


def _project(tmp_path, monkeypatch, base: str):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"base": base, "dir": "models/base"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYNAPLAN_ROOT", str(tmp_path))


def test_stage_materialises_the_configured_model(tiny_model_dir, tmp_path, monkeypatch):
    from tasks.base_model import main

    _project(tmp_path, monkeypatch, str(tiny_model_dir))
    assert main() == 0
    manifest = json.loads((tmp_path / "models/base_manifest.json").read_text())
    assert manifest["source"] == str(tiny_model_dir) and manifest["param_count"] > 0
    assert (tmp_path / "models/base/model.safetensors").is_file()
    assert (tmp_path / "models/base/chat_template.jinja").is_file()


def test_stage_exits_2_on_a_bad_source(tmp_path, monkeypatch, capsys):
    from tasks.base_model import main

    _project(tmp_path, monkeypatch, "no/such/model")
    assert main() == 2
    assert "model.base='no/such/model'" in capsys.readouterr().err
