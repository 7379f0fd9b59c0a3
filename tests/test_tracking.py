"""dynaplan.tracking against a real MLflow store (SQLite in a temp folder, no server)."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pytest

from dynaplan import tracking
from dynaplan.config import Params


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    (root / "params.yaml").write_text("{}\n")
    (root / "code.py").write_text("print('hi')\n")
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text("a\n")
    (root / "data" / "sub").mkdir()
    (root / "data" / "sub" / "b.txt").write_text("b\n")
    (root / "data" / "__pycache__").mkdir()  # ignored by the project's .dvcignore
    (root / "data" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (root / "dvc.yaml").write_text(
        "stages:\n  generate:\n    cmd: python code.py\n    deps:\n    - code.py\n    - data\n    - missing.txt\n"
    )
    return root


@pytest.fixture
def in_store(store, monkeypatch):
    import mlflow

    monkeypatch.chdir(store)
    monkeypatch.setenv(tracking.ROOT_ENV, str(store))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
    yield store
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_stage_run_records_stage_params_tags_and_dep_hashes_in_the_project_sqlite_db(in_store):
    import mlflow

    with tracking.stage_run("generate", Params(), variant="dynamic") as run:
        tracking.log_metrics({"steps": 12, "nested": {"rate": 0.5}, "ok": True, "name": "skipped"})
    assert (in_store / "mlflow.db").is_file()
    record = mlflow.get_run(run.info.run_id)
    assert record.info.status == "FINISHED"
    assert mlflow.get_experiment(record.info.experiment_id).name == "dynaplan"
    tags = record.data.tags
    assert tags[tracking.TAG_STAGE] == "generate"
    assert tags["variant"] == "dynamic"
    assert tags["dvc.dep.code.py"] == hashlib.md5(b"print('hi')\n").hexdigest()
    assert tags["dvc.dep.data"].endswith(".dir")
    assert "dvc.dep.missing.txt" not in tags
    assert record.data.params["generate.workers"] == str(Params().generate.workers)
    assert record.data.params["validate.max_seq_len"] == str(Params().validation.max_seq_len)
    assert record.data.params["envs.crafter.edge_only"] == json.dumps(["water", "lava"])
    assert record.data.metrics == {"steps": 12.0, "nested.rate": 0.5, "ok": 1.0}
    assert record.info.artifact_uri.startswith((in_store / "mlartifacts").as_uri())


def test_a_failing_stage_body_ends_its_run_failed(in_store):
    import mlflow

    with pytest.raises(RuntimeError):
        with tracking.stage_run("validate", {"a": 1}) as run:
            raise RuntimeError("bad data")
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"


def test_stages_of_one_pipeline_run_nest_under_one_parent(in_store, monkeypatch):
    import mlflow

    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "pipe-1")
    with tracking.stage_run("generate", {}) as first:
        pass
    with tracking.stage_run("validate", {}) as second:
        pass
    parent_1 = mlflow.get_run(first.info.run_id).data.tags["mlflow.parentRunId"]
    parent_2 = mlflow.get_run(second.info.run_id).data.tags["mlflow.parentRunId"]
    assert parent_1 == parent_2 == tracking.pipeline_parent_run("pipe-1")
    assert mlflow.get_run(parent_1).data.tags[tracking.TAG_PIPELINE] == "pipe-1"
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "pipe-2")
    with tracking.stage_run("generate", {}) as other:
        pass
    assert mlflow.get_run(other.info.run_id).data.tags["mlflow.parentRunId"] != parent_1


def test_log_dataset_and_artifact_attach_to_the_active_run(in_store):
    import mlflow

    with tracking.stage_run("generate", {}) as run:
        tracking.log_dataset(in_store / "data", "teacher", "d1g3st", "training", schema=pa.schema([("step", pa.int32())]))
        tracking.log_artifact(in_store / "data")
        tracking.log_dataset(in_store / "data", "long", "f" * 64, "validation")
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("teacher", "d1g3st"), ("long", "f" * 32)]
    assert "step" in inputs[0].dataset.schema
    assert {t.key: t.value for t in inputs[1].tags}[tracking.TAG_FULL_DIGEST] == "f" * 64
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"a.txt", "sub"} <= artifacts


def test_dvc_hash_of_a_folder_matches_dvc_datas_tree_digest(store):
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for relpath, content in (("a.txt", b"a\n"), ("sub/b.txt", b"b\n")):
        tree.add(tuple(relpath.split("/")), Meta(), HashInfo("md5", hashlib.md5(content).hexdigest()))
    tree.digest()
    assert tracking.dvc_hash(store / "data") == tree.hash_info.value


def test_flatten_gives_dotted_keys_and_uses_the_validate_alias():
    flat = tracking.flatten(Params())
    assert "validate.plan_max_chars" in flat and "validation.plan_max_chars" not in flat
    assert tracking.flatten({"a": {"b": {"c": 1}}, "d": []}) == {"a.b.c": 1, "d": []}


def test_a_dep_that_another_stage_produces_takes_its_hash_from_that_stages_lock_entry(store, tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text((store / "dvc.yaml").read_text())
    (root / "code.py").write_text("print('hi')\n")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(b"x")
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  upstream:\n    cmd: make data\n    outs:\n    - path: data\n      md5: 0123.dir\n"
    )
    hashes = tracking.stage_dep_hashes("generate", root)
    assert hashes == {"code.py": hashlib.md5(b"print('hi')\n").hexdigest(), "data": "0123.dir"}
