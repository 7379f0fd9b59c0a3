"""`dynaplan serve`: a small OpenAI-compatible chat-completions server over the hf backend, so
machines without a GPU get the same API as `vllm serve` (and the openai backend is tested for real).

Speaks the vLLM dialect: logprobs, `return_tokens_as_token_ids`, `return_token_ids`,
`add_generation_prompt` / `continue_final_message`, `logit_bias`, per-request `seed`. Concurrent
requests with the same sampling settings are generated as one batch. Binds 127.0.0.1 by default.
With `enable_lora` (`dynaplan serve --enable-lora`) it also takes vLLM's runtime adapter API,
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, which PPO's `openai` rollout backend
calls after each update: a loaded adapter is served as its own model name on the first model.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dynaplan.models.base import GenerationRequest, SamplingParams
from dynaplan.models.hf import HFBackend, row_seed


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """The subset of the OpenAI / vLLM chat-completions request we honour; other fields are
    accepted and ignored, as vLLM does for unknown sampling options."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    logprobs: bool = False
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False


class LoraRequest(BaseModel):
    """vLLM's runtime LoRA request body."""

    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1)
    lora_path: str | None = None


class RequestError(ValueError):
    """A request we cannot serve (HTTP 400)."""


@dataclass
class _Job:
    requests: list[GenerationRequest]
    sampling: SamplingParams
    seeds: list[int]
    bias_key: tuple[tuple[int, float], ...]
    future: Future = field(default_factory=Future)


class Batcher:
    """One worker thread owns the model; requests that arrive together and share sampling
    settings and logit_bias are generated as one batch (vLLM batches continuously)."""

    def __init__(self, backend: HFBackend, max_batch: int = 32, window_s: float = 0.01):
        self.backend = backend
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dynaplan-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> Future:
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Finish the queued jobs, then end the worker thread (an unloaded adapter's batcher)."""
        self._queue.put(None)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.window_s
            while sum(len(j.requests) for j in jobs) < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=max(timeout, 0.0)) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.sampling, job.bias_key), []).append(job)
            for (sampling, bias_key), group in groups.items():
                self._run_group(sampling, dict(bias_key), group)

    def _run_group(self, sampling: SamplingParams, bias: dict[int, float], group: list[_Job]) -> None:
        requests = [r for job in group for r in job.requests]
        seeds = [s for job in group for s in job.seeds]
        try:
            generations = self.backend.generate_with_seeds(requests, sampling, seeds, logit_bias=bias or None)
        except Exception as err:  # noqa: BLE001 - handed to the waiting HTTP handlers
            for job in group:
                job.future.set_exception(err)
            return
        start = 0
        for job in group:
            job.future.set_result(generations[start : start + len(job.requests)])
            start += len(job.requests)


def _to_generation_request(body: ChatRequest) -> GenerationRequest:
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    prefix = ""
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise RequestError("continue_final_message=true requires add_generation_prompt=false")
        if messages[-1]["role"] != "assistant":
            raise RequestError("continue_final_message=true requires the last message to be the assistant's")
        prefix = messages.pop()["content"]
        if not messages:
            raise RequestError("continue_final_message needs at least one message before the assistant's")
    elif not body.add_generation_prompt:
        raise RequestError("add_generation_prompt=false is only supported with continue_final_message=true")
    return GenerationRequest(messages=messages, prefix=prefix)


def _token_repr(backend: HFBackend, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else backend.tokenizer.decode([token_id])


def create_app(backends: dict[str, HFBackend], max_batch: int = 32, *, enable_lora: bool = False):
    """The app serving each backend under its model name (requests pick one by `model`; a
    request without `model` goes to the first). With `enable_lora`, adapters loaded at run time
    (on the first model) are served under their `lora_name` until unloaded."""
    from fastapi import FastAPI, HTTPException

    if not backends:
        raise ValueError("create_app needs at least one backend")
    backends = dict(backends)  # adapters come and go at run time
    app = FastAPI(title="dynaplan serve", version="1")
    batchers = {name: Batcher(backend, max_batch=max_batch) for name, backend in backends.items()}
    default_name = next(iter(backends))
    created = int(time.time())

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "dynaplan"} for name in backends
            ],
        }

    if enable_lora:
        lock = threading.Lock()
        fixed = set(backends)

        @app.post("/v1/load_lora_adapter")
        def load_lora_adapter(body: LoraRequest) -> dict[str, str]:
            from pathlib import Path

            from dynaplan.models.hf import AdapterMismatchError

            path = Path(body.lora_path or "")
            if not (path / "adapter_config.json").is_file():
                raise HTTPException(400, f"lora_path {body.lora_path!r}: no adapter_config.json there")
            with lock:
                if body.lora_name in backends:
                    raise HTTPException(400, f"an adapter or model named {body.lora_name!r} is already loaded")
                base = backends[default_name]
                try:
                    backend = HFBackend(base.model_dir, str(path), device=str(base.device), dtype=next(base.model.parameters()).dtype)
                except AdapterMismatchError as err:
                    raise HTTPException(400, str(err)) from None
                backends[body.lora_name] = backend
                batchers[body.lora_name] = Batcher(backend, max_batch=max_batch)
            return {"status": "ok", "lora_name": body.lora_name}

        @app.post("/v1/unload_lora_adapter")
        def unload_lora_adapter(body: LoraRequest) -> dict[str, str]:
            with lock:
                if body.lora_name in fixed or body.lora_name not in backends:
                    raise HTTPException(404, f"no loaded adapter named {body.lora_name!r}")
                del backends[body.lora_name]
                batchers.pop(body.lora_name).close()
            return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest) -> dict[str, Any]:
        if body.stream:
            raise HTTPException(400, "stream=true is not supported by dynaplan serve")
        model_name = default_name if body.model is None else body.model
        if model_name not in backends:
            raise HTTPException(404, f"model {body.model!r} not served here; this server serves {sorted(backends)}")
        backend, batcher = backends[model_name], batchers[model_name]
        try:
            request = _to_generation_request(body)
            bias = tuple(sorted((int(k), float(v)) for k, v in (body.logit_bias or {}).items()))
        except (RequestError, ValueError) as err:
            raise HTTPException(400, str(err)) from None
        max_new = body.max_completion_tokens or body.max_tokens or 256
        sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, max_new_tokens=max_new)
        base_seed = body.seed if body.seed is not None else secrets.randbits(62)
        # n answers: the first uses the seed as given, so n=1 matches hf's per-answer seed exactly
        seeds = [base_seed] + [row_seed(base_seed, i) for i in range(1, body.n)]
        job = _Job([request] * body.n, sampling, seeds, bias)
        try:
            generations = batcher.submit(job).result()
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        choices = []
        for index, gen in enumerate(generations):
            choice: dict[str, Any] = {
                "index": index,
                # as vLLM: with continue_final_message the content is the continuation only
                "message": {"role": "assistant", "content": gen.text[len(request.prefix) :]},
                "finish_reason": gen.finish_reason,
                "logprobs": None,
            }
            if body.logprobs:
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": _token_repr(backend, t, body.return_tokens_as_token_ids),
                            "logprob": lp,
                            "bytes": list(backend.tokenizer.decode([t]).encode("utf-8")),
                            "top_logprobs": [],
                        }
                        for t, lp in zip(gen.token_ids, gen.logprobs)
                    ]
                }
            if body.return_token_ids:
                choice["token_ids"] = gen.token_ids
            choices.append(choice)
        completion = sum(len(g.token_ids) for g in generations)
        prompt_ids = generations[0].prompt_token_ids
        response: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion, "total_tokens": len(prompt_ids) + completion},
        }
        if body.return_token_ids:
            response["prompt_token_ids"] = prompt_ids
        return response

    return app


def serve(
    model_dirs: str | list[str],
    adapter_dir: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    max_batch: int = 32,
    enable_lora: bool = False,
) -> None:
    """Load the model(s) and serve until interrupted (blocking). Each model is served under its
    path as given (or `model_name`, one model only); `adapter_dir` needs exactly one model;
    `enable_lora` turns on the runtime adapter API (vLLM's `--enable-lora` and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
    import uvicorn

    dirs = [model_dirs] if isinstance(model_dirs, str) else list(model_dirs)
    if len(dirs) > 1 and (adapter_dir is not None or model_name is not None):
        raise ValueError("--adapter and --name need exactly one --model")
    backends = {
        (model_name or str(d)): HFBackend(d, adapter_dir, device=device, dtype=dtype) for d in dirs
    }
    app = create_app(backends, max_batch=max_batch, enable_lora=enable_lora)
    uvicorn.run(app, host=host, port=port, log_level="warning")
