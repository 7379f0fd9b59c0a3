"""End to end, as a team runs it: a real Prefect server and a real MLflow server on 127.0.0.1
(free ports, SQLite, everything under tmp), a `cpu` and a `gpu` process worker (the gpu one on
the CPU here, with its own runs folder and DVC cache, so data reaches it only through the DVC
remote), the deployments of flows/prefect.yaml, and the pipeline deployment triggered through
the API exactly as the UI's Run button does (create_flow_run_from_deployment with parameters).

Checked: the stages ran on the pools they belong to, the DVC outputs are in the run's working
copy and in the remote, the MLflow runs are in the server, and a second identical run recomputes
nothing. Tiny profile: base_model (the tiny random model), generate (1 Crafter + 2 POGS episodes),
validate (sent to the gpu pool). Every process started here is stopped by the fixture, and the
test checks none is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
MARK = "DYNAPLAN_E2E_MARK"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def marked_pids(mark: str) -> list[int]:
    """Processes (ours: started by this test) whose environment carries the test's mark."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


class Stack:
    def __init__(self, root: Path):
        self.root = root
        self.mark = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []
        self.prefect_port = free_port()
        self.mlflow_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        self.remote = root / "dvc-remote"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DYNAPLAN_"))}
        self.env = {
            **base,
            MARK: self.mark,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + base.get("PATH", ""),
            "OMP_NUM_THREADS": "1",
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "DYNAPLAN_REPO": str(REPO_ROOT),
            "DYNAPLAN_DVC_REMOTE": str(self.remote),
        }

    def start(self, name: str, cmd: list[str], **extra_env: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole below
        )
        self.procs.append(proc)
        return proc

    def wait_http(self, url: str, name: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(1)
        raise RuntimeError(f"{name} did not come up at {url}:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> list[int]:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # flow-run processes a worker started in their own session, if any outlived it
        for pid in marked_pids(self.mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        return marked_pids(self.mark)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    stack = Stack(root)
    try:
        stack.start("prefect-server", [sys.executable, "-m", "prefect", "server", "start",
                                       "--host", "127.0.0.1", "--port", str(stack.prefect_port)])
        stack.start("mlflow-server", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                                      "--port", str(stack.mlflow_port), "--workers", "1",
                                      "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                      "--default-artifact-root", (root / "mlartifacts").as_uri()])
        stack.wait_http(f"{stack.api_url}/health", "prefect-server")
        stack.wait_http(f"{stack.mlflow_url}/health", "mlflow-server")
        subprocess.run([sys.executable, "-m", "flows.deployments"], cwd=REPO_ROOT, env=stack.env,
                       check=True, capture_output=True, timeout=300)
        # two "machines": their own runs folders and DVC caches, one DVC remote between them
        for pool in ("cpu", "gpu"):
            stack.start(f"worker-{pool}", [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                           "--type", "process", "--name", f"e2e-{pool}"],
                        DYNAPLAN_RUNS_DIR=str(root / f"runs-{pool}"), DYNAPLAN_DVC_CACHE=str(root / f"cache-{pool}"))
        yield stack
    finally:
        leftover = stack.stop()
        assert not leftover, f"processes left behind: {leftover}"


def _client(stack: Stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @contextlib.contextmanager
    def opened():
        with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
            with get_client(sync_client=True) as client:
                yield client

    return opened()


def run_from_ui(stack: Stack, deployment_name: str, parameters: dict, timeout: float = 900):
    """What the UI's Run button does: a flow run of the deployment with the edited parameters."""
    with _client(stack) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            flow_run = client.read_flow_run(flow_run.id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(3)
    raise AssertionError(f"{deployment_name} run did not finish in {timeout}s:\n{stack.log('worker-cpu')}\n{stack.log('worker-gpu')}")


def flow_runs_of(stack: Stack, deployment_name: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client(stack) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))


def stage_table(stack: Stack, flow_run_id) -> dict[str, tuple[str, str]]:
    """`{stage: (pool, outcome)}` from the run's markdown artifact."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with _client(stack) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dynaplan-pipeline"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    assert artifacts, "the pipeline run published no artifact"
    rows = re.findall(r"^\| (\S+) \| (\S+) \| (\S+) \|", artifacts[0].data, flags=re.M)
    return {stage: (pool, outcome) for stage, pool, outcome in rows if stage != "stage" and not stage.startswith("-")}


def mlflow_stage_runs(stack: Stack, pipeline_run_id: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_url)
    experiment = client.get_experiment_by_name("dynaplan")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`dynaplan.pipeline_run_id` = '{pipeline_run_id}' and tags.`dynaplan.kind` = 'stage'")
    return sorted(run.data.tags["dynaplan.stage"] for run in runs)


def test_pipeline_deployment_run_from_the_api_uses_both_pools_and_a_rerun_recomputes_nothing(team, tiny_model_dir):
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    parameters = {
        "stages": ["validate"],
        "revision": revision,
        "gpu_stages": ["validate"],  # on the tiny profile the data gate stands in for a GPU stage
        "overrides": {
            "model.base": str(tiny_model_dir),
            "generate.crafter_episodes": 1, "generate.crafter_max_steps": 20, "generate.pogs_episodes": 2,
            "generate.episodes_per_shard": 2, "generate.workers": 1,
        },
    }
    first = run_from_ui(team, "dynaplan-pipeline/pipeline", parameters)
    assert first.state.is_completed(), f"{first.state}\n{team.log('worker-cpu')}\n{team.log('worker-gpu')}"
    assert first.work_pool_name == "cpu"
    gpu_runs = flow_runs_of(team, "dynaplan-stage/gpu")
    assert len(gpu_runs) == 1 and gpu_runs[0].work_pool_name == "gpu" and gpu_runs[0].state.is_completed()
    assert stage_table(team, first.id) == {
        "base_model": ("cpu", "ran"), "generate": ("cpu", "ran"), "validate": ("gpu", "ran"),
    }

    copy = team.root / "runs-cpu" / str(first.id)
    assert (copy / "data" / "teacher" / "manifest.json").is_file()
    assert (copy / "models" / "base" / "config.json").is_file()
    gpu_copy = next((team.root / "runs-gpu").glob(f"{first.id}-*"))
    assert (gpu_copy / "reports" / "validate" / "summary.json").is_file()  # validate ran there
    import yaml

    lock = yaml.safe_load((copy / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"base_model", "generate", "validate"}  # the gpu run's entry came back
    teacher_hash = next(out["md5"] for out in lock["generate"]["outs"] if out["path"] == "data/teacher")
    assert (team.remote / "files" / "md5" / teacher_hash[:2] / teacher_hash[2:]).is_file(), "data/teacher not in the remote"
    assert any((team.remote / "runs").rglob("*")), "no run cache in the remote"
    assert mlflow_stage_runs(team, str(first.id)) == ["base_model", "generate", "validate"]

    second = run_from_ui(team, "dynaplan-pipeline/pipeline", parameters)
    assert second.state.is_completed(), f"{second.state}\n{team.log('worker-cpu')}\n{team.log('worker-gpu')}"
    outcomes = stage_table(team, second.id)
    assert {stage: pool for stage, (pool, _) in outcomes.items()} == {"base_model": "cpu", "generate": "cpu", "validate": "gpu"}
    assert {outcome for _, outcome in outcomes.values()} <= {"restored", "unchanged"}, outcomes
    assert mlflow_stage_runs(team, str(second.id)) == []  # no stage ran, so no stage logged a run
    second_gpu_copy = next((team.root / "runs-gpu").glob(f"{second.id}-*"))
    assert (second_gpu_copy / "reports" / "validate" / "summary.json").is_file()  # restored, not rerun

    # A colleague's fresh clone of the first run's commit (dvc.lock, params and the small
    # `cache: false` metrics committed, as DVC intends), with an empty cache of its own and the
    # same remote: `dvc repro --pull` reproduces every stage without running any.
    from flows import workspace as W

    committed = ["dvc.lock", "params.yaml"] + [
        path for stage in ("base_model", "generate", "validate")
        for path, options in W.stage_outputs(copy, stage) if options.get("cache") is False and (copy / path).exists()
    ]
    subprocess.run(["git", "add", "-f", *committed], cwd=copy, check=True)
    subprocess.run(["git", "-c", "user.name=e2e", "-c", "user.email=e2e@example.com", "commit", "-q", "-m", "tiny run"],
                   cwd=copy, check=True)
    fresh = W.create_workspace("fresh-clone", repo=str(copy), revision="HEAD", runs_dir=team.root / "colleague",
                               cache_dir=team.root / "colleague-cache", remote=str(team.remote))
    done = W.repro(fresh, "validate", upstream=True)
    assert set(done) == {"base_model", "generate", "validate"} and set(done.values()) <= {"restored", "unchanged"}, done
    assert (fresh.path / "data" / "teacher" / "manifest.json").is_file()
    assert (fresh.path / "models" / "base" / "config.json").is_file()


def test_promote_deployment_on_the_gpu_pool_moves_champion_only_for_a_better_candidate(team, monkeypatch):
    """The `promote` deployment against the real MLflow server's registry: version 2 beats the
    champion (version 1) on the same 4 held-out seeds and is promoted; version 3, worse, is not."""
    from mlflow import MlflowClient

    from dynaplan import promotion

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.mlflow_url)
    client = MlflowClient(tracking_uri=team.mlflow_url)
    client.create_registered_model("dynaplan-agent")
    experiment = client.get_experiment_by_name("dynaplan") or client.get_experiment(client.create_experiment("dynaplan"))
    for _ in range(3):
        # a server accepts a local source only inside the artifacts of the run named with it
        run = client.create_run(experiment.experiment_id)
        client.create_model_version("dynaplan-agent", source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    seeds = tuple(range(1_000_000, 1_000_004))
    per_seed = {"1": (0.1, 0.2, 0.3, 0.2), "2": (0.3, 0.5, 0.4, 0.6), "3": (0.0, 0.1, 0.2, 0.1)}
    for version, progression in per_seed.items():
        promotion.record_evaluation("dynaplan-agent", promotion.Evaluation(version, seeds, progression, (150.0,) * 4), env="pogs")
    client.set_registered_model_alias("dynaplan-agent", "champion", "1")
    gate = {"episodes": 4, "evaluate_missing": False, "overrides": {"promote.env": "pogs", "seeds.eval_start": 1_000_000}}

    better = run_from_ui(team, "dynaplan-promote/promote", {**gate, "candidate": "2"})
    assert better.state.is_completed(), f"{better.state}\n{team.log('worker-gpu')}"
    assert better.work_pool_name == "gpu"
    assert str(client.get_model_version_by_alias("dynaplan-agent", "champion").version) == "2"
    decision = client.get_model_version("dynaplan-agent", "1").tags[promotion.OUTCOME_TAG]
    assert decision == "promoted"

    worse = run_from_ui(team, "dynaplan-promote/promote", {**gate, "candidate": "3"})
    assert worse.state.is_completed(), f"{worse.state}\n{team.log('worker-gpu')}"
    assert str(client.get_model_version_by_alias("dynaplan-agent", "champion").version) == "2"
    assert client.get_model_version("dynaplan-agent", "3").tags[promotion.OUTCOME_TAG] == "kept"
