"""End to end: `dvc repro` of base_model -> generate -> validate in a temporary copy of the repo.

Starts real `dvc` processes (and through them the stage scripts) in a copy of the working tree
(`git ls-files`, committed into a fresh git repo there) with a tiny profile: the tiny random model
from the models fixture as `model.base`, one short Crafter episode on a small map, two POGS
episodes. Checks the outputs, that a second `dvc repro` re-runs nothing, `dvc exp run -S`, the
MLflow record of the stage (dep hashes equal dvc.lock's), and exit code 2 on bad params.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
STAGES = ("base_model", "generate", "validate")


def _run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("e2e") / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["base"] = str(tiny_model_dir)
    params["envs"]["crafter"]["area"] = 32
    params["generate"].update(crafter_episodes=1, crafter_max_steps=10, pogs_episodes=2, episodes_per_shard=1, workers=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        # The stages run this copy's code (the package is installed editable from the checkout).
        "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root.parent / 'mlflow.db'}",
        "DYNAPLAN_PIPELINE_RUN_ID": "e2e-1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("DYNAPLAN_ROOT", None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    _run(["git", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run([*git, "commit", "-qm", "copy"], root, env)
    started = time.perf_counter()
    first = _run([sys.executable, "-m", "dvc", "repro", "validate"], root, env)
    return root, env, first, time.perf_counter() - started


def test_repro_runs_the_chain_and_writes_every_declared_output(project):
    root, _, first, seconds = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    manifest = json.loads((root / "data/teacher/manifest.json").read_text())
    assert manifest["envs"]["crafter"]["episodes"] == 1 and manifest["envs"]["pogs"]["episodes"] == 2
    assert len(list((root / "data/teacher").glob("*.parquet"))) == 3
    summary = json.loads((root / "reports/validate/summary.json").read_text())
    assert summary["success"] is True and summary["dataset_digest"] == manifest["digest"]
    assert (root / "reports/validate/data_docs/index.html").is_file()
    metrics = json.loads((root / "reports/generate/metrics.json").read_text())
    assert metrics["rows"] == manifest["rows"] > 0
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(STAGES) <= set(lock["stages"])
    print(f"first dvc repro (tiny profile): {seconds:.1f}s")


def test_second_repro_is_a_fast_no_op(project):
    root, env, _, _ = project
    before = (root / "dvc.lock").read_text()
    started = time.perf_counter()
    again = _run([sys.executable, "-m", "dvc", "repro", "validate"], root, env)
    seconds = time.perf_counter() - started
    assert "Running stage" not in again.stdout
    assert (root / "dvc.lock").read_text() == before
    print(f"no-op dvc repro: {seconds:.2f}s")
    assert seconds < 15  # < 5 s on an idle machine; the margin is for a loaded test machine


def test_dvc_dag_shows_the_chain(project):
    root, env, _, _ = project
    dag = _run([sys.executable, "-m", "dvc", "dag", "--dot"], root, env).stdout
    assert '"base_model" -> "generate"' in dag and '"generate" -> "validate"' in dag


def test_stage_runs_are_tracked_with_the_dvc_hashes_of_their_deps(project):
    import mlflow

    root, env, _, _ = project
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["dynaplan"], filter_string="tags.`dynaplan.stage` = 'generate'", output_format="list")
    assert len(runs) == 1
    run = runs[0]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["generate"]
    for dep in lock["deps"]:
        assert run.data.tags[f"dvc.dep.{dep['path']}"] == dep["md5"], dep["path"]
    assert run.data.tags["dynaplan.pipeline_run_id"] == "e2e-1"
    assert run.data.params["generate.pogs_episodes"] == "2"
    manifest = json.loads((root / "data/teacher/manifest.json").read_text())
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [manifest["digest"][:32]]


@pytest.mark.slow  # one more generate + validate run (about a minute on an idle machine)
def test_exp_run_with_a_param_override_reruns_generate_and_keeps_unchanged_shards(project):
    root, env, _, _ = project
    shards_before = {p.name for p in (root / "data/teacher").glob("*.parquet")}
    proc = _run([sys.executable, "-m", "dvc", "exp", "run", "validate", "-S", "generate.pogs_episodes=3"], root, env)
    assert "Running stage 'generate'" in proc.stdout and "Running stage 'base_model'" not in proc.stdout
    manifest = json.loads((root / "data/teacher/manifest.json").read_text())
    assert manifest["envs"]["pogs"]["episodes"] == 3
    shards_after = {p.name for p in (root / "data/teacher").glob("*.parquet")}
    assert shards_before < shards_after and len(shards_after) == 4
    assert json.loads((root / "reports/validate/summary.json").read_text())["success"] is True


def test_bad_params_exit_2_naming_the_key_before_any_work(project, tmp_path):
    root, env, _, _ = project
    bad = tmp_path / "bad"
    top_level_outputs = {"data", "models", "reports", ".git", ".dvc"}
    shutil.copytree(root, bad, ignore=lambda folder, names: top_level_outputs & set(names) if Path(folder) == root else set())
    params = yaml.safe_load((bad / "params.yaml").read_text())
    params["generate"]["pogs_episodes"] = -1
    (bad / "params.yaml").write_text(yaml.safe_dump(params))
    tasks = (["tasks.base_model"], ["tasks.generate"], ["tasks.validate"], ["tasks.sft", "--variant", "dynamic"],
             ["tasks.ppo", "--ablation", "base"], ["tasks.promote"])
    for task in tasks:
        proc = _run([sys.executable, "-m", *task], bad, {**env, "PYTHONPATH": os.pathsep.join([str(bad / "src"), str(bad)])}, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "generate.pogs_episodes" in proc.stderr and "-1" in proc.stderr
    assert not (bad / "data").exists() and not (bad / "mlflow.db").exists()
