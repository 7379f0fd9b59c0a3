"""The one module that talks to MLflow: a run per stage execution, params, metrics, datasets.

Every stage opens `stage_run(...)`; nothing else in the project imports mlflow for tracking.
It must not decide anything about training or data: it records what the callers hand it.

Layout of the records: experiment `dynaplan`; with `DYNAPLAN_PIPELINE_RUN_ID` set (by a Prefect
flow or `make repro`), every stage run is nested under one parent run per pipeline run, found by
its tag `dynaplan.pipeline_run_id`. Default store: `sqlite:///<project root>/mlflow.db` with
artifacts in `<project root>/mlartifacts`, unless `MLFLOW_TRACKING_URI` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

EXPERIMENT = "dynaplan"
PIPELINE_RUN_ENV = "DYNAPLAN_PIPELINE_RUN_ID"
ROOT_ENV = "DYNAPLAN_ROOT"
TAG_STAGE = "dynaplan.stage"
TAG_PIPELINE = "dynaplan.pipeline_run_id"
TAG_KIND = "dynaplan.kind"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_DVC_DEP = "dvc.dep."
_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
_MAX_DIGEST_CHARS = 36  # MLflow's limit on a dataset digest
DATASET_DIGEST_CHARS = 32
TAG_FULL_DIGEST = "dynaplan.digest"


def project_root() -> Path:
    """The project root: `$DYNAPLAN_ROOT`, else the nearest folder up from the working directory
    that holds `dvc.yaml` or `params.yaml` (DVC runs every stage there), else the working dir."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() or (folder / "params.yaml").is_file():
            return folder
    return here


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _mlflow():
    # Imported lazily: mlflow takes seconds to import and most callers (tests, `params check`)
    # never track anything.
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def experiment_id() -> str:
    """The id of the `dynaplan` experiment, created on first use (local artifacts next to the db)."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so compare rather than test presence.
    if tracking_uri() == default_tracking_uri():
        artifact_location = (project_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    except Exception:
        # Another stage created it between our lookup and our create.
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(params: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, Any]:
    """Nested params to flat dotted keys (`generate.workers`); lists stay one value."""
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json", by_alias=True)
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json", by_alias=True)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(root: Path | None = None) -> str | None:
    """HEAD's commit id, with `-dirty` appended when tracked files differ from it."""
    root = root or project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def _md5_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def _dvc_ignored(relpath: Path) -> bool:
    # The patterns of the project's .dvcignore (bytecode is not source).
    return "__pycache__" in relpath.parts or relpath.suffix == ".pyc"


def dvc_hash(path: Path) -> str:
    """The hash DVC 3 records in dvc.lock for a dep: the file's md5, or for a folder the md5 of
    its sorted JSON listing plus `.dir` (as dvc_data's Tree.digest computes it), skipping what
    the project's .dvcignore skips."""
    if path.is_file():
        return _md5_file(path)
    entries = [
        {"md5": _md5_file(file), "relpath": file.relative_to(path).as_posix()}
        for file in path.rglob("*")
        if file.is_file() and not _dvc_ignored(file.relative_to(path))
    ]
    entries.sort(key=lambda entry: entry["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def stage_dep_hashes(stage: str, root: Path | None = None) -> dict[str, str]:
    """`{dep path: hash}` for the deps that dvc.yaml declares for `stage`. Sources are hashed now
    (this stage's own dvc.lock entry is rewritten only after its command returns, so it would
    describe the last run); outputs of other stages come from their dvc.lock entries."""
    root = root or project_root()
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    # A dep that another stage produces (a model, a dataset: the big ones) is hashed already in
    # that stage's dvc.lock entry, written before this stage runs; only sources are hashed here.
    produced = _locked_outs(root)
    hashes: dict[str, str] = {}
    for dep in (stages.get(stage) or {}).get("deps", []):
        dep_path = dep if isinstance(dep, str) else next(iter(dep))
        full = root / dep_path
        if dep_path in produced:
            hashes[dep_path] = produced[dep_path]
        elif full.exists():
            hashes[dep_path] = dvc_hash(full)
    return hashes


def _locked_outs(root: Path) -> dict[str, str]:
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    outs: dict[str, str] = {}
    for entry in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).values():
        for out in entry.get("outs", []):
            if out.get("md5"):
                outs[out["path"]] = out["md5"]
    return outs


def pipeline_parent_run(pipeline_run_id: str) -> str:
    """The MLflow run id of the parent run that groups one pipeline run's stages (created once)."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    exp_id = experiment_id()
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{TAG_PIPELINE}` = '{pipeline_run_id}' and tags.`{TAG_KIND}` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id,
        run_name=f"pipeline-{pipeline_run_id}",
        tags={TAG_PIPELINE: pipeline_run_id, TAG_KIND: "pipeline"},
    )
    return run.info.run_id


def finish_pipeline_run(pipeline_run_id: str, status: str = "FINISHED") -> None:
    """Mark a pipeline's parent run as ended (the flow calls this when it is done)."""
    mlflow = _mlflow()
    mlflow.MlflowClient().set_terminated(pipeline_parent_run(pipeline_run_id), status=status)


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | BaseModel | None = None, **tags: Any) -> Iterator[Any]:
    """One MLflow run for one execution of `stage`: yields the `mlflow.ActiveRun`.

    Tags: the stage, the git commit, the pipeline run id (`$DYNAPLAN_PIPELINE_RUN_ID`, which also
    nests the run under that pipeline's parent run), `dvc.dep.<path>` hashes of the stage's deps,
    plus any `tags` given. `params` are logged flat with dotted keys. The run ends FAILED if the
    body raises.
    """
    mlflow = _mlflow()
    exp_id = experiment_id()
    root = project_root()
    run_tags: dict[str, str] = {TAG_STAGE: stage, TAG_KIND: "stage"}
    commit = git_commit(root)
    if commit:
        run_tags[TAG_GIT_COMMIT] = commit
    for dep_path, value in stage_dep_hashes(stage, root).items():
        run_tags[f"{TAG_DVC_DEP}{dep_path}"] = value
    pipeline_run_id = os.environ.get(PIPELINE_RUN_ENV)
    parent_run_id = None
    if pipeline_run_id:
        run_tags[TAG_PIPELINE] = pipeline_run_id
        parent_run_id = pipeline_parent_run(pipeline_run_id)
    run_tags.update({key: str(value) for key, value in tags.items()})
    # A caller's leftover active run (a notebook, a failed test) must not swallow this stage.
    while mlflow.active_run() is not None:
        mlflow.end_run()
    with mlflow.start_run(
        experiment_id=exp_id, run_name=stage, parent_run_id=parent_run_id, tags=run_tags
    ) as run:
        if params is not None:
            flat = {key: _param_value(value) for key, value in flatten(params).items()}
            if flat:
                mlflow.log_params(flat)
        yield run


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_MAX_PARAM_CHARS]


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log numeric metrics (nested dicts become dotted keys; booleans become 0/1; others skipped)."""
    mlflow = _mlflow()
    numeric: dict[str, float] = {}
    for key, value in flatten(dict(metrics)).items():
        if isinstance(value, bool):
            numeric[key] = float(value)
        elif isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            numeric[key] = float(value)
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_dataset(
    path: str | os.PathLike[str],
    name: str,
    digest: str,
    context: str = "training",
    schema: Any = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Record a dataset on disk as an MLflow dataset input of the active run, with our digest
    (a digest longer than MLflow's 36 characters is stored as its first 32, whole in the input
    tag `dynaplan.digest`).

    `schema` may be a pyarrow schema (converted to an MLflow column schema) or None.
    """
    mlflow = _mlflow()
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # Two registered classes both claim file:// URIs; MLflow picks the local one, as we want.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    input_tags = dict(tags or {})
    if len(digest) > _MAX_DIGEST_CHARS:
        # MLflow caps a dataset digest at 36 characters: keep a prefix there, the whole in a tag.
        input_tags[TAG_FULL_DIGEST] = digest
    short = digest[:DATASET_DIGEST_CHARS] if len(digest) > _MAX_DIGEST_CHARS else digest
    dataset = MetaDataset(source=source, name=name, digest=short, schema=_mlflow_schema(schema))
    mlflow.log_input(dataset, context=context, tags=input_tags or None)


def _mlflow_schema(schema: Any):
    if schema is None:
        return None
    from mlflow.types import ColSpec, DataType, Schema

    def _type(arrow_type) -> DataType:
        text = str(arrow_type)
        if text.startswith("int"):
            return DataType.long
        if text.startswith(("float", "double")):
            return DataType.double
        if text == "bool":
            return DataType.boolean
        return DataType.string

    return Schema([ColSpec(_type(field.type), field.name) for field in schema])


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    """Copy a file or a folder into the active run's artifacts."""
    mlflow = _mlflow()
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


# --- model registry aliases and version tags (used by the promotion gate, dynaplan.promotion) ---


def version_for_alias(model_name: str, alias: str) -> str | None:
    """The version number that `alias` points at, or None if the model or the alias is absent."""
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_tags(model_name: str, version: str) -> dict[str, str]:
    mlflow = _mlflow()
    return dict(mlflow.MlflowClient().get_model_version(model_name, str(version)).tags or {})


def set_version_tags(model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value if isinstance(value, str) else json.dumps(value))


def set_alias(model_name: str, alias: str, version: str) -> None:
    _mlflow().MlflowClient().set_registered_model_alias(model_name, alias, str(version))


def delete_alias(model_name: str, alias: str) -> None:
    _mlflow().MlflowClient().delete_registered_model_alias(model_name, alias)


# --- the agent registry: SFT/PPO adapters as versions of `dynaplan-agent` (SFT helper) ---------

AGENT_MODEL = "dynaplan-agent"
_AGENT_PYFUNC = Path(__file__).resolve().parent / "train" / "agent_pyfunc.py"
# Adapter files a version needs (a checkpoint also holds optimizer and RNG state: not logged).
_ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "dynaplan_adapter.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def _agent_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("torch", "transformers", "peft", "safetensors", "mlflow"):
        try:
            reqs.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pass
    return reqs


def log_agent_model(
    adapter_dir: str | os.PathLike[str],
    base_model_dir: str | os.PathLike[str],
    *,
    example_messages: list[dict[str, str]],
    base_model: str,
    name: str = "agent",
    max_new_tokens: int = 96,
    step: int = 0,
) -> Any:
    """Log an adapter as an MLflow pyfunc model (models from code: `train/agent_pyfunc.py`, the
    adapter files as an artifact, the base model referenced by its directory, not copied) in
    the active run, with a signature (JSON chat prompt in, answer out) and an input example.
    Returns MLflow's ModelInfo. Logging loads the model once to check the example answers."""
    import tempfile

    import pandas as pd

    mlflow = _mlflow()
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    adapter_dir = Path(adapter_dir)
    base_model_dir = Path(base_model_dir).resolve()
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "messages")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", max_new_tokens),
                ParamSpec("temperature", "double", 0.0),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )
    example = pd.DataFrame({"messages": [json.dumps(example_messages)]})
    with tempfile.TemporaryDirectory(prefix="dynaplan-adapter-") as tmp:
        # Only the adapter and tokenizer: a Trainer checkpoint's optimizer state stays behind.
        staged = Path(tmp) / "adapter"
        staged.mkdir()
        for file_name in _ADAPTER_FILES:
            if (adapter_dir / file_name).is_file():
                (staged / file_name).write_bytes((adapter_dir / file_name).read_bytes())
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(_AGENT_PYFUNC),
            artifacts={"adapter": str(staged)},
            model_config={
                "base_model_dir": str(base_model_dir),
                "base_model": base_model,
                "max_new_tokens": max_new_tokens,
            },
            signature=signature,
            input_example=example,
            pip_requirements=_agent_requirements(),
            step=step,
        )


def register_agent(
    model_uri: str,
    *,
    stage: str,
    variant: str,
    base_model: str,
    dataset_digest: str,
    plan_cost: float | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    name: str = AGENT_MODEL,
) -> Any:
    """Register a logged agent model as a new version of `dynaplan-agent`, tagged with the
    stage (sft|ppo), variant, base model, dataset digest, git commit and plan cost."""
    mlflow = _mlflow()
    tags: dict[str, str] = {
        "stage": stage,
        "variant": variant,
        "base_model": base_model,
        "dataset_digest": dataset_digest,
        "git_commit": git_commit() or "unknown",
    }
    if plan_cost is not None:
        tags["plan_cost"] = str(plan_cost)
    for key, value in (extra_tags or {}).items():
        tags[key] = value if isinstance(value, str) else json.dumps(value)
    return mlflow.register_model(model_uri, name, tags=tags)


def load_agent(model_uri: str, dst: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """`models:/dynaplan-agent/<version>` or `models:/dynaplan-agent@<alias>` -> (base model dir,
    adapter dir), what `HFBackend(base_dir, adapter_dir)` loads. The adapter is downloaded;
    the base model is the directory recorded at logging time (`DYNAPLAN_BASE_MODEL_DIR`
    overrides it, e.g. on another machine). Raises FileNotFoundError if that dir is missing."""
    mlflow = _mlflow()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=None if dst is None else str(dst)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel.get("flavors", {}).get("python_function", {})
    config = pyfunc.get("config") or pyfunc.get("model_config") or {}
    adapter = local / "artifacts" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        found = list(local.rglob("adapter_config.json"))
        if not found:
            raise FileNotFoundError(f"{model_uri}: no adapter in the model's artifacts ({local})")
        adapter = found[0].parent
    base = Path(os.environ.get("DYNAPLAN_BASE_MODEL_DIR") or config.get("base_model_dir", ""))
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_uri}: base model dir {str(base)!r} not found; set DYNAPLAN_BASE_MODEL_DIR to the "
            f"base model {config.get('base_model')!r} the adapter was trained on"
        )
    return base, adapter


def resolve_version(model_uri: str) -> str:
    """The version number behind `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    body = model_uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return str(_mlflow().MlflowClient().get_model_version_by_alias(name, alias).version)
    return body.rsplit("/", 1)[1]


def set_version_metrics(
    version: str, metrics: Mapping[str, Any], prefix: str = "metric.", name: str = AGENT_MODEL
) -> None:
    """Record evaluation results on a version: one `<prefix><key>` tag per numeric metric
    (nested dicts become dotted keys), shown in the registry UI next to the version's tags."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    numeric = {
        key: float(value)
        for key, value in flatten(dict(metrics)).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value))
    }
    for key, value in numeric.items():
        client.set_model_version_tag(name, str(version), f"{prefix}{key}", f"{value:.6g}")
