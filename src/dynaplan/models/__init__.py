"""Model backends behind one interface (`dynaplan.models.base.Backend`): hf, openai, vllm.

`load_backend(kind, **kwargs)` picks one. Importing this package imports neither torch-heavy
backends nor vLLM; each backend module is imported when it is asked for.
"""

from __future__ import annotations

from typing import Any

from dynaplan.models.base import Backend, Generation, GenerationRequest, SamplingParams

BACKENDS = ("hf", "openai", "vllm")

__all__ = ["BACKENDS", "Backend", "Generation", "GenerationRequest", "SamplingParams", "load_backend"]


def load_backend(kind: str, **kwargs: Any) -> Backend:
    """'hf' -> HFBackend(model_dir, adapter_dir=None, device=, dtype=, ...);
    'openai' -> OpenAIBackend(base_url, model, tokenizer=, api_key_env=, timeout=, max_retries=,
    concurrency=); 'vllm' -> VLLMBackend(model_dir, adapter_dir=None, ...)."""
    # `model` / `adapter` are accepted as aliases of model_dir / adapter_dir for hf and vllm
    if kind in ("hf", "vllm"):
        if "model" in kwargs:
            kwargs["model_dir"] = kwargs.pop("model")
        if "adapter" in kwargs:
            kwargs["adapter_dir"] = kwargs.pop("adapter")
    if kind == "hf":
        from dynaplan.models.hf import HFBackend

        return HFBackend(**kwargs)
    if kind == "openai":
        from dynaplan.models.openai import OpenAIBackend

        return OpenAIBackend(**kwargs)
    if kind == "vllm":
        from dynaplan.models.vllm import VLLMBackend

        return VLLMBackend(**kwargs)
    raise ValueError(f"unknown backend {kind!r}: expected one of {', '.join(BACKENDS)}")
