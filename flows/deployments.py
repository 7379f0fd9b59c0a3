"""Create the `cpu` and `gpu` work pools (base job templates from infra/prefect/) and the
deployments listed in flows/prefect.yaml, through the Prefect API of $PREFECT_API_URL.

`python -m flows.deployments` does what `prefect deploy --all --prefect-file flows/prefect.yaml`
does, without prompts, plus the work pools. It starts no worker and runs no flow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO_ROOT / "flows" / "prefect.yaml"
TEMPLATES = REPO_ROOT / "infra" / "prefect"
POOLS = {"cpu": "process-cpu.json", "gpu": "process-gpu.json"}


def deployment_specs(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    return list((yaml.safe_load(prefect_file.read_text()) or {}).get("deployments") or [])


def ensure_work_pools(pools: dict[str, str] = POOLS, templates: Path = TEMPLATES) -> list[str]:
    """Create each process work pool, or update its base job template if it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    done = []
    with get_client(sync_client=True) as client:
        for name, template_file in pools.items():
            template = json.loads((templates / template_file).read_text())
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template,
                                                       description=f"dynaplan {name} stages"))
            except ObjectAlreadyExists:
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            done.append(name)
    return done


def deploy_all(repo: Path = REPO_ROOT, prefect_file: Path = PREFECT_FILE, only: list[str] | None = None) -> dict[str, str]:
    """Register every deployment of `prefect_file` with its code at `repo` (a process worker
    imports the entrypoint from there); returns `{flow/deployment: id}`."""
    from prefect import Flow

    created: dict[str, str] = {}
    for spec in deployment_specs(prefect_file):
        if only and spec["name"] not in only:
            continue
        flow = Flow.from_source(source=str(repo), entrypoint=spec["entrypoint"])
        pool = spec.get("work_pool") or {}
        deployment_id = flow.deploy(
            name=spec["name"],
            work_pool_name=pool["name"],
            work_queue_name=pool.get("work_queue_name"),
            job_variables=pool.get("job_variables") or None,
            parameters=spec.get("parameters") or None,
            description=spec.get("description"),
            tags=spec.get("tags"),
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
        )
        created[f"{flow.name}/{spec['name']}"] = str(deployment_id)
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="deploy only this deployment name (repeatable)")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="where workers find the flow code")
    args = parser.parse_args(argv)
    pools = ensure_work_pools()
    print(f"work pools: {', '.join(pools)}")
    for name, deployment_id in deploy_all(args.repo.resolve(), only=args.only).items():
        print(f"deployment {name}: {deployment_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
