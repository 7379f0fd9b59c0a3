"""Per-run working copies (flows/workspace.py) on a small real git + DVC project in tmp: params
overrides land in the copy only, two copies share one DVC cache, and a second identical run
restores every stage instead of recomputing it (the pooled lock entries cover the `persist`
stage that DVC's run cache skips). Every stage appends its name to a log so recomputation shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import workspace as W

REPO_ROOT = Path(__file__).resolve().parents[2]

TOY_SCRIPT = '''
import os, sys, yaml
stage = sys.argv[1]
with open(os.environ["TOY_LOG"], "a") as log:
    log.write(stage + "\\n")
seed = yaml.safe_load(open("params.yaml"))["generate"]["seed"]
os.makedirs("data", exist_ok=True)
if stage == "make_data":
    open("data/teacher.txt", "w").write(f"seed={seed}\\n")
else:
    text = open("data/teacher.txt").read()
    open("summary.json", "w").write('{"chars": %d}' % len(text))
'''

TOY_DVC = {
    "stages": {
        "make_data": {
            "cmd": "python toy.py make_data",
            "deps": ["toy.py"],
            "params": ["generate.seed"],
            "outs": [{"data": {"persist": True}}],
        },
        "summarize": {
            "cmd": "python toy.py summarize",
            "deps": ["toy.py", "data"],
            "metrics": [{"summary.json": {"cache": False}}],
        },
    }
}


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    repo = root / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "toy.py").write_text(TOY_SCRIPT)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC))
    (repo / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    # `cache: false` outs are tracked by git, as DVC intends (summary.json is committed below)
    (repo / ".gitignore").write_text("/data\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "toy")
    return root, repo


def run_all(ws, pool="cpu"):
    outcomes = {}
    for stage in W.stages_to_run(W.stage_graph(ws.path), None):
        W.seed_lock_from_pool(ws, stage)
        outcomes.update(W.repro(ws, stage))
        W.remember_lock(ws, stage)
    W.push(ws)
    return outcomes


def test_override_merge_handles_dotted_and_nested_keys():
    raw = {"generate": {"seed": 0, "workers": 2}, "envs": {"pogs": {"k": 2}}}
    merged = W.apply_overrides(raw, {"generate.seed": 5, "envs": {"pogs": {"k": 3}}})
    assert merged == {"generate": {"seed": 5, "workers": 2}, "envs": {"pogs": {"k": 3}}}
    assert raw["generate"]["seed"] == 0


def test_bad_override_is_rejected_with_the_key_named(toy, tmp_path):
    from dynaplan.config import ConfigError

    _, repo = toy
    with pytest.raises(ConfigError, match="generate.workers"):
        W.create_workspace("bad", overrides={"generate.workers": 0}, repo=str(repo), runs_dir=tmp_path, cache_dir=tmp_path / "c")


def test_unknown_revision_is_a_clear_error(toy, tmp_path):
    _, repo = toy
    with pytest.raises(W.WorkspaceError, match="no-such-branch"):
        W.create_workspace("x", revision="no-such-branch", repo=str(repo), runs_dir=tmp_path)


def test_second_identical_run_restores_every_stage_from_the_shared_cache(toy, tmp_path, monkeypatch):
    root, repo = toy
    log = tmp_path / "stages.log"
    monkeypatch.setenv("TOY_LOG", str(log))
    common = dict(repo=str(repo), runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache", remote=str(tmp_path / "remote"))

    first = W.create_workspace("run-1", overrides={"generate.seed": 7}, **common)
    assert yaml.safe_load(first.params_file.read_text())["generate"]["seed"] == 7
    assert yaml.safe_load((repo / "params.yaml").read_text())["generate"]["seed"] == 0  # the user's checkout is untouched
    assert run_all(first) == {"make_data": "ran", "summarize": "ran"}
    assert (first.path / "data" / "teacher.txt").read_text() == "seed=7\n"
    assert any((tmp_path / "remote").rglob("*")), "dvc push left the remote empty"

    second = W.create_workspace("run-2", overrides={"generate.seed": 7}, **common)
    outcomes = run_all(second)
    assert set(outcomes.values()) <= {"restored", "unchanged"}, outcomes
    assert log.read_text().split() == ["make_data", "summarize"]  # nothing ran twice
    assert (second.path / "data" / "teacher.txt").read_text() == "seed=7\n"
    assert (second.path / "summary.json").is_file()


@pytest.mark.slow
def test_changed_param_reruns_only_what_depends_on_it(toy, tmp_path, monkeypatch):
    _, repo = toy
    log = tmp_path / "stages.log"
    monkeypatch.setenv("TOY_LOG", str(log))
    common = dict(repo=str(repo), runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache", remote=str(tmp_path / "remote"))
    run_all(W.create_workspace("seed-7", overrides={"generate.seed": 7}, **common))
    changed = W.create_workspace("seed-8", overrides={"generate.seed": 8}, **common)
    assert run_all(changed) == {"make_data": "ran", "summarize": "ran"}
    assert (changed.path / "data" / "teacher.txt").read_text() == "seed=8\n"
    # a third copy at seed 7 again still finds seed 7's results (the pool keeps several entries)
    again = W.create_workspace("seed-7-again", overrides={"generate.seed": 7}, **common)
    assert set(run_all(again).values()) <= {"restored", "unchanged"}
    assert (again.path / "data" / "teacher.txt").read_text() == "seed=7\n"


@pytest.mark.slow
def test_fresh_clone_with_empty_cache_pulls_from_the_remote_instead_of_recomputing(toy, tmp_path, monkeypatch):
    """Clone A reproduces, pushes data and run cache, and commits dvc.lock; clone B (its own,
    empty cache) runs `dvc repro --pull` and recomputes nothing."""
    root, repo = toy
    log = tmp_path / "stages.log"
    monkeypatch.setenv("TOY_LOG", str(log))
    remote = str(tmp_path / "remote")
    a = W.create_workspace("clone-a", repo=str(repo), runs_dir=tmp_path / "a", cache_dir=tmp_path / "cache-a", remote=remote)
    run_all(a)
    git(a.path, "add", "dvc.lock", "summary.json")
    git(a.path, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "lock")
    ran_before = log.read_text().split()

    b = W.create_workspace("clone-b", repo=str(a.path), revision="HEAD", runs_dir=tmp_path / "b", cache_dir=tmp_path / "cache-b", remote=remote)
    outcomes = W.repro(b, "summarize", upstream=True)
    assert set(outcomes.values()) <= {"restored", "unchanged"}, outcomes
    assert log.read_text().split() == ran_before
    assert (b.path / "data" / "teacher.txt").is_file() and (b.path / "summary.json").is_file()
