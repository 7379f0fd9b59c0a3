"""Static validation of infra/compose.yaml (CI has no Docker engine): it parses, every service is
complete and wired to services, volumes and variables that exist, published ports bind 127.0.0.1
unless DYNAPLAN_BIND says otherwise, and no credential is written in the file. Where the docker
CLI has the compose plugin, `docker compose config` must accept the file too."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "ports", "volumes", "depends_on",
    "restart", "healthcheck", "working_dir", "profiles", "deploy", "shm_size", "ipc", "user", "networks", "labels",
}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY_ID|ROOT_USER)$")
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")
SERVICES = {"postgres", "minio", "mlflow", "prefect-server", "worker-cpu", "worker-gpu", "vllm"}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}; `$$` is a literal `$`."""

    def value(match: re.Match) -> str:
        name, kind, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"required variable {name} is unset ({arg})")
        return arg or ""

    return VAR.sub(value, text.replace("$$", "\0")).replace("\0", "$")


def example_env() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), example_env()))


def test_compose_has_the_team_services_and_only_known_keys(compose):
    assert {key for key in compose if not key.startswith("x-")} <= TOP_LEVEL  # x-*: compose extensions
    assert SERVICES <= set(compose["services"])
    for name, service in compose["services"].items():
        assert set(service) <= SERVICE_KEYS, f"{name}: unknown keys {set(service) - SERVICE_KEYS}"
        assert "image" in service or "build" in service, f"{name} has neither image nor build"


def test_dependencies_and_named_volumes_exist(compose):
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in volumes, f"{name} mounts undeclared volume {source}"
    for service in ("worker-gpu", "vllm"):
        devices = services[service]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert services[service]["profiles"] == ["gpu"], "GPU services must not start on CPU-only machines"


def test_published_ports_bind_localhost_by_default(compose):
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports") or []:
            published += 1
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond localhost"
    assert published >= 4


def test_bind_address_is_configurable_on_purpose():
    opened = yaml.safe_load(interpolate(COMPOSE.read_text(), {**example_env(), "DYNAPLAN_BIND": "0.0.0.0"}))
    assert opened["services"]["mlflow"]["ports"] == ["0.0.0.0:5000:5000"]


def test_no_credentials_in_the_file_and_every_required_variable_documented():
    raw = yaml.safe_load(COMPOSE.read_text())
    documented = set(example_env())
    required = {m.group(1) for m in VAR.finditer(COMPOSE.read_text()) if m.group(2) == "?"}
    assert required and required <= documented, f"undocumented in .env.example: {required - documented}"

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                yield from walk(v, key)
        else:
            yield key, str(node)

    for key, value in walk(raw):
        if SECRET_NAME.search(key):
            assert "${" in value, f"{key} has a literal value in compose.yaml; take it from the environment"
        assert not re.search(r"://[^/\s:$]+:[^@\s$]+@", value), f"credentials in a URL: {value}"
    gitignore = (INFRA.parent / ".gitignore").read_text()
    assert "/infra/.env" in gitignore.split()


def test_required_credentials_fail_loudly_when_unset():
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD|MINIO_ROOT"):
        interpolate(COMPOSE.read_text(), {})


def test_services_reach_each_other_by_compose_names(compose):
    worker = compose["services"]["worker-cpu"]["environment"]
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["DYNAPLAN_DVC_REMOTE"].startswith("s3://")
    assert "--pool gpu" in " ".join(compose["services"]["worker-gpu"]["command"])
    assert "--pool cpu" in " ".join(compose["services"]["worker-cpu"]["command"])
    assert "postgresql://" in compose["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]


def test_docker_compose_config_accepts_the_file_where_the_plugin_exists(tmp_path):
    """`docker compose config` with the example env, when the CLI has the compose plugin; the
    static checks above stand in for it on machines without one (like this CI)."""
    docker = shutil.which("docker")
    has_plugin = bool(docker) and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    if not has_plugin:
        # the equivalent static check: the whole file interpolates and parses as YAML mappings
        assert isinstance(yaml.safe_load(interpolate(COMPOSE.read_text(), example_env())), dict)
        return
    proc = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "--profile", "gpu", "config", "--quiet"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
