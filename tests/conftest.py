"""Shared pytest fixtures. Each fixture block is owned by the helper named above it; add yours
with a small edit, never rewrite the file."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- models helper: tiny random model with the real SmolLM2 tokenizer (no download) -------------


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """The real SmolLM2 tokenizer + chat template, extracted from the embedded GGUF once and
    cached under $DYNAPLAN_CACHE (default ~/.cache/dynaplan)."""
    from dynaplan.models.materialize import smollm2_tokenizer_dir as build

    return build()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A 2-layer, 64-wide random Llama saved as a safetensors HF dir (tokenizer and chat template
    included), loadable like models/base. Session-scoped: build once, do not modify it."""
    from dynaplan.models.materialize import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", smollm2_tokenizer_dir, seed=0)


# --- backbone helper: isolated MLflow store, one Prefect test server per session ---------------


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow(tmp_path_factory):
    """Tests never write into the project's mlflow.db: every test (and every subprocess it
    starts) tracks into a session-wide SQLite store in a temp folder unless it sets its own."""
    import os

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    if previous is None:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield os.environ["MLFLOW_TRACKING_URI"]
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary local API server and database), started once per
    session because it takes tens of seconds on a loaded machine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
