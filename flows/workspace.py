"""One working copy of the repository per flow run: a git clone at a fixed commit, its own
params.yaml (profile + overrides, validated), and the DVC cache and remote shared with everyone.

So two runs started from the Prefect UI never write into each other's folders or into the user's
checkout, and a stage whose deps and params are unchanged is restored from the shared run cache
instead of being recomputed. This module only prepares folders and runs `dvc`; no stage logic.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

# Where things live, overridable per worker machine (a GPU worker has its own disk).
REPO_ENV = "DYNAPLAN_REPO"  # the git repository runs clone from (a path or a git URL)
RUNS_ENV = "DYNAPLAN_RUNS_DIR"  # parent of the per-run working copies
CACHE_ENV = "DYNAPLAN_DVC_CACHE"  # the shared DVC cache (holds the run cache under runs/)
REMOTE_ENV = "DYNAPLAN_DVC_REMOTE"  # the shared DVC remote (a path, s3://..., ...)
REMOTE_ENDPOINT_ENV = "DYNAPLAN_DVC_REMOTE_ENDPOINT"  # its endpoint URL when it is not AWS
PIPELINE_RUN_ENV = "DYNAPLAN_PIPELINE_RUN_ID"  # groups a pipeline's MLflow runs (dynaplan.tracking)
SHARED_REMOTE = "shared"

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class WorkspaceError(RuntimeError):
    """A working copy that cannot be made (unknown revision, bad override, dvc failure)."""


@dataclass(frozen=True)
class StageOutcome:
    """What `dvc repro` did with one stage in one working copy."""

    stage: str
    outcome: str  # ran | restored (from the run cache) | unchanged (already up to date here)
    seconds: float
    pool: str | None = None  # the Prefect work pool whose worker ran it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_repo() -> str:
    """The repository runs are cloned from: `$DYNAPLAN_REPO`, else the checkout this code is in."""
    return os.environ.get(REPO_ENV) or str(Path(__file__).resolve().parents[1])


def _run(cmd: Sequence[str], cwd: str | Path, env: Mapping[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=str(cwd), env=dict(env) if env else None, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise WorkspaceError(
            f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def resolve_revision(repo: str, revision: str = "HEAD") -> str:
    """The full commit id of `revision` in `repo` (a branch, tag, short id or HEAD)."""
    if Path(repo).is_dir():
        proc = _run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=repo, check=False)
        if proc.returncode != 0:
            raise WorkspaceError(f"git revision {revision!r} not found in {repo}")
        return proc.stdout.strip()
    proc = _run(["git", "ls-remote", repo, revision], cwd=".", check=False)
    line = proc.stdout.split("\n", 1)[0]
    if proc.returncode != 0 or not line:
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            return revision
        raise WorkspaceError(f"git revision {revision!r} not found in {repo}")
    return line.split()[0]


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `overrides` into a params mapping. Keys are dotted paths (`generate.pogs_episodes`)
    or nested mappings; a mapping value merges, anything else replaces."""
    merged = json.loads(json.dumps(dict(raw)))  # a deep copy that also rejects non-YAML values

    def put(target: dict, path: list[str], value: Any) -> None:
        for key in path[:-1]:
            node = target.get(key)
            if not isinstance(node, dict):
                node = target[key] = {}
            target = node
        last = path[-1]
        if isinstance(value, Mapping) and isinstance(target.get(last), dict):
            for sub_key, sub_value in value.items():
                put(target[last], [str(sub_key)], sub_value)
        else:
            target[last] = json.loads(json.dumps(value))

    for key, value in overrides.items():
        put(merged, str(key).split("."), value)
    return merged


def share_tracking() -> str:
    """Point this process, and every stage it starts in a working copy, at one MLflow store:
    `$MLFLOW_TRACKING_URI` if set, else the checkout's own mlflow.db (not one per copy). The
    experiment is created here first, so its artifact location is the checkout's too."""
    from dynaplan import tracking

    tracking.experiment_id()
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    return os.environ["MLFLOW_TRACKING_URI"]


def backend_overrides(backend: str | None) -> dict[str, Any]:
    """The params keys a model backend choice (hf | openai | vllm) sets: evaluation and PPO rollouts."""
    if not backend:
        return {}
    return {"evaluate.backend": backend, "ppo.rollout_backend": backend}


def write_params(copy: Path, overrides: Mapping[str, Any], profile: str | None = None) -> dict[str, Any]:
    """Rewrite `copy/params.yaml` as params + profile file + overrides, validated by
    dynaplan.config (a bad key or value raises ConfigError naming it). Returns what was written."""
    from dynaplan.config import parse_params

    params_path = copy / "params.yaml"
    raw = yaml.safe_load(params_path.read_text()) or {}
    if profile:
        profile_path = copy / profile
        if not profile_path.is_file():
            raise WorkspaceError(f"params profile {profile!r} not found at revision (looked for {profile_path})")
        raw = apply_overrides(raw, yaml.safe_load(profile_path.read_text()) or {})
    raw = apply_overrides(raw, overrides)
    parse_params(raw, f"params.yaml + profile {profile!r} + overrides {dict(overrides)!r}")
    tmp = params_path.with_name("params.yaml.tmp")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.replace(tmp, params_path)
    return raw


def dvc_env(copy: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of `dvc` in a working copy: its own code first on the import path (the
    package is installed editable from the user's checkout, which may be at another commit),
    the venv's `python` first on PATH (stage commands say `python -m tasks.<stage>`)."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["DYNAPLAN_ROOT"] = str(copy)
    # no __pycache__ inside deps folders of the copy (the pool compares folder hashes)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    if extra:
        env.update(extra)
    return env


def dvc(copy: Path, *args: str, env: Mapping[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd=copy, env=env or dvc_env(copy), check=check)


def _default_remote_url(repo: str) -> str | None:
    """The source checkout's default DVC remote as an absolute URL (a relative path in
    .dvc/config is relative to .dvc/, which would point inside each clone)."""
    if not Path(repo).is_dir():
        return None
    proc = _run([sys.executable, "-m", "dvc", "remote", "list"], cwd=repo, check=False)
    default = _run([sys.executable, "-m", "dvc", "config", "core.remote"], cwd=repo, check=False).stdout.strip()
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and (parts[0] == default or not default):
            url = parts[1]
            if "://" in url or Path(url).is_absolute():
                return url
            return str((Path(repo) / ".dvc" / url).resolve())
    return None


def _default_cache_dir(repo: str) -> str | None:
    if not Path(repo).is_dir():
        return None
    proc = _run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=repo, check=False)
    return proc.stdout.strip() or str(Path(repo) / ".dvc" / "cache")


@dataclass(frozen=True)
class Workspace:
    path: Path
    revision: str
    remote: str | None
    cache_dir: Path

    @property
    def params_file(self) -> Path:
        return self.path / "params.yaml"


def create_workspace(
    run_name: str,
    *,
    revision: str = "HEAD",
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    repo: str | None = None,
    runs_dir: str | Path | None = None,
    cache_dir: str | None = None,
    remote: str | None = None,
) -> Workspace:
    """Clone `repo` at `revision` into `runs_dir/run_name` (reused if it exists at that commit,
    so a retried flow run resumes), apply `profile` and `overrides` to its params.yaml, point
    its DVC cache at the shared cache and its default remote at the shared remote."""
    repo = repo or source_repo()
    commit = resolve_revision(repo, revision)
    runs_root = Path(runs_dir or os.environ.get(RUNS_ENV) or Path(source_repo()) / "runs").resolve()
    path = runs_root / _SAFE_NAME.sub("-", run_name)
    if (path / ".git").is_dir():
        head = _run(["git", "rev-parse", "HEAD"], cwd=path).stdout.strip()
        if head != commit:
            raise WorkspaceError(f"{path} exists at commit {head[:12]}, not {commit[:12]}; use another run name")
    else:
        runs_root.mkdir(parents=True, exist_ok=True)
        # --no-checkout then a detached checkout: works for any commit, not just branch tips.
        _run(["git", "clone", "--quiet", "--no-checkout", repo, str(path)], cwd=runs_root)
        _run(["git", "checkout", "--quiet", "--detach", commit], cwd=path)
    if not (path / ".dvc").is_dir():
        raise WorkspaceError(f"revision {commit[:12]} of {repo} has no .dvc folder (not a DVC project)")
    write_params(path, overrides or {}, profile)
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or _default_cache_dir(repo) or path / ".dvc" / "cache").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    remote = remote or os.environ.get(REMOTE_ENV) or _default_remote_url(repo)
    # .dvc/config.local: this copy's own settings, never committed (what `dvc cache dir --local`
    # and `dvc remote add --local --default` write, without two more dvc start-ups).
    lines = ["[cache]", f"    dir = {cache}"]
    if remote:
        lines += ["[core]", f"    remote = {SHARED_REMOTE}", f"['remote \"{SHARED_REMOTE}\"']", f"    url = {remote}"]
        if os.environ.get(REMOTE_ENDPOINT_ENV):  # an S3-compatible store such as MinIO
            lines.append(f"    endpointurl = {os.environ[REMOTE_ENDPOINT_ENV]}")
    (path / ".dvc" / "config.local").write_text("\n".join(lines) + "\n")
    return Workspace(path=path, revision=commit, remote=remote, cache_dir=cache)


# --- running stages ---------------------------------------------------------------------------

_RAN = re.compile(r"Running stage '([^']+)'")
_RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")
_UNCHANGED = re.compile(r"Stage '([^']+)' didn't change, skipping")
_PULLED = re.compile(r"Pulling data for stage: '([^']+)'")


def parse_repro_output(text: str) -> dict[str, str]:
    """`{stage: ran | restored | unchanged}` from `dvc repro` output (its log lines are the only
    place DVC says whether it used the run cache)."""
    outcomes: dict[str, str] = {}
    for pattern, outcome in ((_UNCHANGED, "unchanged"), (_PULLED, "restored"), (_RESTORED, "restored"), (_RAN, "ran")):
        for name in pattern.findall(text):
            # "ran" wins over the others: a stage that ran was not restored.
            if outcome == "ran" or name not in outcomes:
                outcomes[name] = outcome
    return outcomes


def repro(ws: Workspace, stage: str, *, upstream: bool = False, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`dvc repro --pull` of one stage (with `upstream`, of what it needs too) in a working copy.
    `--pull`: a stage whose dvc.lock entry matches is checked out from the shared cache or the
    remote, one found in the run cache is restored; only a changed stage runs. Returns the
    outcome of every stage DVC touched."""
    args = ["repro", "--pull"] + ([] if upstream else ["--single-item"]) + [stage]
    proc = dvc(ws.path, *args, env=dvc_env(ws.path, extra_env))
    return parse_repro_output(proc.stdout + proc.stderr)


def push(ws: Workspace, stages: Sequence[str] = ()) -> None:
    """Push the stages' outputs and the run cache to the shared remote (no-op without one)."""
    if ws.remote:
        dvc(ws.path, "push", "--run-cache", *stages)


def stage_graph(copy: Path) -> dict[str, set[str]]:
    """`{stage: the stages it directly depends on}`, as DVC itself sees the graph (`dvc dag`,
    so foreach/matrix stages are expanded and out/dep matching is DVC's own)."""
    dot = dvc(copy, "dag", "--dot").stdout
    graph: dict[str, set[str]] = {name: set() for name in re.findall(r'^"([^"]+)";$', dot, flags=re.M)}
    for upstream, downstream in re.findall(r'"([^"]+)"\s*->\s*"([^"]+)"', dot):
        graph.setdefault(downstream, set()).add(upstream)
        graph.setdefault(upstream, set())
    return graph


def stages_to_run(graph: Mapping[str, set[str]], targets: Sequence[str] | None) -> list[str]:
    """The targets and everything upstream of them, upstream first (all stages if no targets)."""
    import networkx as nx

    unknown = [t for t in (targets or []) if t not in graph]
    if unknown:
        raise WorkspaceError(f"unknown stage(s) {unknown}; dvc.yaml has {sorted(graph)}")
    dag = nx.DiGraph()
    dag.add_nodes_from(graph)
    for stage, upstream in graph.items():
        dag.add_edges_from((u, stage) for u in upstream)
    wanted = set(targets) if targets else set(graph)
    for target in list(wanted):
        wanted |= nx.ancestors(dag, target)
    order = list(nx.lexicographical_topological_sort(dag))
    return [stage for stage in order if stage in wanted]


# --- stages DVC's run cache skips ---------------------------------------------------------------
# DVC's run cache does not cover stages with `persist` outs (generate keeps finished shards across
# an interrupted run) or uncached plain outs (validate's Data Docs), and a new working copy starts
# from the committed dvc.lock. So the lock
# entry of such a stage, plus copies of its small `cache: false` outs (metrics, plots), is kept in
# a pool beside the shared cache and handed to the next working copy before the stage runs; its
# cached outs then come out of the cache with `dvc repro --pull`. DVC checks the entry against the
# copy's params, deps and command, so a stale entry only means the stage runs, never that a
# wrong output is used.

LOCK_POOL_DIR = "dynaplan-locks"
_POOL_SIZE = 20


def read_lock(copy: Path) -> dict[str, dict[str, Any]]:
    path = copy / "dvc.lock"
    if not path.is_file():
        return {}
    return dict((yaml.safe_load(path.read_text()) or {}).get("stages") or {})


def write_lock_entries(copy: Path, entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Add `entries` to the copy's dvc.lock for stages it has no entry for; returns those stages."""
    path = copy / "dvc.lock"
    data = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    data.setdefault("schema", "2.0")
    stages = data.get("stages") or {}
    data["stages"] = stages
    added = [name for name in entries if name not in stages]
    if not added:
        return []
    for name in added:
        stages[name] = json.loads(json.dumps(entries[name]))
    tmp = path.with_name("dvc.lock.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
    return added


def stage_outputs(copy: Path, stage: str) -> list[tuple[str, dict[str, Any]]]:
    """`[(path, options)]` of a stage's outs, metrics and plots as dvc.yaml declares them
    (`name@key` of a foreach stage looks at its `do` body)."""
    stages = (yaml.safe_load((copy / "dvc.yaml").read_text()) or {}).get("stages") or {}
    definition = stages.get(stage) or (stages.get(stage.split("@")[0]) or {}).get("do") or {}
    found = []
    for kind in ("outs", "metrics", "plots"):
        for item in definition.get(kind) or []:
            if isinstance(item, str):
                found.append((item, {"cache": True, "kind": kind}))
            else:
                path, options = next(iter(item.items()))
                options = dict(options or {})
                options.setdefault("cache", True)
                options["kind"] = kind
                found.append((path, options))
    return found


def skipped_by_run_cache(copy: Path, stage: str) -> bool:
    """DVC saves no run-cache entry for a stage with a `persist` out or an uncached plain out
    (metrics and plots may be uncached); see dvc.stage.Stage.run and dvc.stage.cache._can_hash."""
    return any(
        options.get("persist") or (options["kind"] == "outs" and options.get("cache") is False)
        for _, options in stage_outputs(copy, stage)
    )


def _pool_dir(cache_dir: Path, stage: str) -> Path:
    return Path(cache_dir) / LOCK_POOL_DIR / _SAFE_NAME.sub("-", stage)


def _entry_key(entry: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def remember_lock(ws: Workspace, stage: str) -> None:
    """Pool the copy's lock entry and uncached outs of a stage the run cache skips."""
    if not skipped_by_run_cache(ws.path, stage):
        return
    entry = read_lock(ws.path).get(stage)
    if not entry:
        return
    import shutil

    folder = _pool_dir(ws.cache_dir, stage) / _entry_key(entry)
    if not (folder / "entry.json").is_file():
        staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        for path, options in stage_outputs(ws.path, stage):
            source = ws.path / path
            if options.get("cache") is False and source.exists():
                target = staging / "files" / path
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "entry.json").write_text(json.dumps(entry))
        try:
            os.replace(staging, folder)
        except OSError:  # another run pooled the same entry first
            shutil.rmtree(staging, ignore_errors=True)
    os.utime(folder)
    entries = sorted(_pool_dir(ws.cache_dir, stage).glob("*/entry.json"), key=lambda f: f.parent.stat().st_mtime, reverse=True)
    for stale in entries[_POOL_SIZE:]:
        shutil.rmtree(stale.parent, ignore_errors=True)


def _param_value(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _entry_matches(copy: Path, entry: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """Params and deps as the copy has them now (DVC then checks all of it again)."""
    from dynaplan.tracking import dvc_hash

    for values in (entry.get("params") or {}).values():
        for key, value in values.items():
            if _param_value(params, key) != value:
                return False
    for dep in entry.get("deps") or []:
        dep_path = copy / dep["path"]
        if not dep_path.exists() or dvc_hash(dep_path) != dep.get("md5"):
            return False
    return True


def seed_lock_from_pool(ws: Workspace, stage: str) -> bool:
    """For a stage the run cache skips: give the copy the most recent pooled lock entry whose
    params and deps match the copy now, with its uncached outs. True if one was given."""
    import shutil

    if not skipped_by_run_cache(ws.path, stage) or stage in read_lock(ws.path):
        return False
    params = yaml.safe_load(ws.params_file.read_text()) or {}
    entries = sorted(_pool_dir(ws.cache_dir, stage).glob("*/entry.json"), key=lambda f: f.parent.stat().st_mtime, reverse=True)
    for entry_file in entries:
        entry = json.loads(entry_file.read_text())
        if not _entry_matches(ws.path, entry, params):
            continue
        files = entry_file.parent / "files"
        if files.is_dir():
            shutil.copytree(files, ws.path, dirs_exist_ok=True)
        return bool(write_lock_entries(ws.path, {stage: entry}))
    return False
