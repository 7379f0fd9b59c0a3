"""load_backend dispatch, and vLLM staying a lazy, GPU-only import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynaplan.models import load_backend


def test_importing_models_never_imports_vllm():
    code = (
        "import sys, dynaplan.models, dynaplan.models.vllm, dynaplan.models.hf, dynaplan.models.openai;"
        "assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vllm_backend_without_vllm_says_how_to_install():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:  # a GPU image: this test is about the CPU environment
        pytest.skip("vllm is installed here")
    with pytest.raises(ImportError, match=r"dynaplan\[gpu\]"):
        load_backend("vllm", model="models/base")


def test_load_backend_dispatch(tiny_model_dir):
    backend = load_backend("hf", model=tiny_model_dir)
    assert backend.name == "hf" and backend.count_tokens("Move West") == 2
    with pytest.raises(ValueError, match="expected one of hf, openai, vllm"):
        load_backend("llamacpp")
    with pytest.raises(ValueError, match="tokenizer"):
        load_backend("openai", base_url="http://127.0.0.1:9/v1", model="some-remote-name")


def test_serve_rejects_a_missing_model_dir_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from dynaplan.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "nope"), "--port", "9"])
    assert result.exit_code == 2
    assert "config.json" in result.output
