"""load_backend dispatch, and vLLM staying a lazy, GPU-only import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynaplan.models import load_backend


def test_importing_models_never_imports_vllm():
    # a finder that records every attempt to import vllm, so the test means something even
    # where vllm is not installed (an attempt would otherwise just fail quietly in a try)
    code = """
import sys
attempts = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            attempts.append(name)
        return None
sys.meta_path.insert(0, Spy())
import dynaplan.models, dynaplan.models.vllm, dynaplan.models.hf, dynaplan.models.openai, dynaplan.models.server
from dynaplan.models import load_backend
assert not attempts, attempts
try:
    load_backend("vllm", model="models/base")
except ImportError:
    pass
assert attempts, "constructing VLLMBackend should try to import vllm"
"""
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
