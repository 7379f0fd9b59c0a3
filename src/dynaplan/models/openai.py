"""The `openai` backend: any OpenAI-compatible chat-completions server (`vllm serve`,
`dynaplan serve`), with timeouts, retries with exponential backoff, bounded concurrency, and a
clear `BackendUnavailable` error (never a hang) when the server is down.

Token ids and log-probs: we ask for `logprobs=true` plus vLLM's `return_token_ids` and
`return_tokens_as_token_ids` extras (vLLM >= 0.10.2 and `dynaplan serve` honour them). Without
them we fall back to tokenizing locally with the model's tokenizer (log-probs then come from the
logprobs list when its length matches, else NaN). Forced prefixes use vLLM's
`continue_final_message`; `forbid_plan` becomes a `logit_bias` of -100 on the plan-opening tokens
(at every position, slightly stronger than the hf backend's first-position ban). vLLM reports raw
log-probs (before temperature); `dynaplan serve` reports them after temperature, like hf.
Set `vllm_extras=False` for servers that reject unknown fields (api.openai.com).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from dynaplan.models.base import Generation, GenerationRequest, SamplingParams, chat_prompt_token_ids
from dynaplan.models.hf import plan_opening_token_ids, row_seed, stop_token_ids

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class BackendUnavailable(RuntimeError):
    """The server could not be reached (or kept failing) after all retries."""


class BackendError(RuntimeError):
    """The server answered with an error that retrying cannot fix (4xx other than 429)."""


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, httpx.ConnectError) and "refused" in text.lower():
        return "connection refused"
    if isinstance(err, httpx.TimeoutException):
        return f"timed out ({type(err).__name__})"
    return text


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer: Any = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        concurrency: int = 8,
        vllm_extras: bool = True,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = max(1, concurrency)
        self.vllm_extras = vllm_extras
        self.tokenizer = self._load_tokenizer(tokenizer, model)
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-backend")
        self._banned: list[int] | None = None
        self.stop_ids = stop_token_ids(self.tokenizer)

    @staticmethod
    def _load_tokenizer(tokenizer: Any, model: str):
        from transformers import AutoTokenizer

        if tokenizer is None:
            if not (Path(model) / "tokenizer_config.json").is_file():
                raise ValueError(
                    f"OpenAIBackend needs the model's tokenizer (token counts, plan ban, fallback token ids): "
                    f"pass tokenizer=<local HF dir>; model={model!r} is not a local model directory"
                )
            tokenizer = model
        if isinstance(tokenizer, (str, os.PathLike)):
            return AutoTokenizer.from_pretrained(str(tokenizer))
        return tokenizer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- tokens -----------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def local_prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        return chat_prompt_token_ids(self.tokenizer, request)

    def _plan_bias(self) -> dict[str, int]:
        if self._banned is None:
            self._banned = plan_opening_token_ids(self.tokenizer)
        return {str(t): -100 for t in self._banned}

    # ---- HTTP -------------------------------------------------------------------------------
    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                # exponential backoff with a little jitter so concurrent callers do not stampede
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (1 + 0.1 * random.random()))
            try:
                response = self._client.post(path, json=payload)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                last = _reason(err)
                continue
            if response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise BackendError(f"{url} answered HTTP {response.status_code}: {response.text[:500]}")
            return response.json()
        raise BackendUnavailable(f"could not reach {url} after {self.max_retries} retries: {last}")

    def health(self) -> bool:
        try:
            return self._client.get("/models").status_code == 200
        except httpx.HTTPError:
            return False

    # ---- generation -------------------------------------------------------------------------
    def _payload(self, request: GenerationRequest, sampling: SamplingParams, seed: int) -> dict[str, Any]:
        messages = [dict(m) for m in request.messages]
        payload: dict[str, Any] = {
            "model": self.model,
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "max_tokens": int(sampling.max_new_tokens),
            "seed": int(seed),
            "n": 1,
            "logprobs": True,
        }
        if request.prefix:
            messages.append({"role": "assistant", "content": request.prefix})
            payload["add_generation_prompt"] = False
            payload["continue_final_message"] = True
        if request.forbid_plan and not request.prefix.strip():
            payload["logit_bias"] = self._plan_bias()
        if self.vllm_extras:
            payload["return_token_ids"] = True
            payload["return_tokens_as_token_ids"] = True
        payload["messages"] = messages
        return payload

    def _parse(self, request: GenerationRequest, response: dict[str, Any]) -> Generation:
        choice = response["choices"][0]
        content = (choice.get("message") or {}).get("content") or ""
        finish = choice.get("finish_reason") or "stop"
        finish = "length" if finish == "length" else "stop"
        entries = ((choice.get("logprobs") or {}).get("content")) or []
        token_ids = choice.get("token_ids")
        if token_ids is None and entries and all(str(e.get("token", "")).startswith("token_id:") for e in entries):
            token_ids = [int(e["token"].split(":", 1)[1]) for e in entries]
        source = "server"
        if token_ids is None:
            source = "local"
            token_ids = self.tokenizer.encode(content, add_special_tokens=False)
            if finish == "stop" and self.tokenizer.eos_token_id is not None:
                token_ids.append(int(self.tokenizer.eos_token_id))
        logprobs = [float(e["logprob"]) for e in entries]
        if len(logprobs) != len(token_ids):
            logprobs = [math.nan] * len(token_ids)
        prompt_ids = response.get("prompt_token_ids") or self.local_prompt_token_ids(request)
        return Generation(
            text=request.prefix + content,
            token_ids=list(token_ids),
            logprobs=logprobs,
            prompt_token_ids=list(prompt_ids),
            finish_reason=finish,
            extra={"token_ids_from": source},
        )

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, seed: int
    ) -> list[Generation]:
        def one(i: int) -> Generation:
            request = requests[i]
            return self._parse(request, self._post("/chat/completions", self._payload(request, sampling, row_seed(seed, i))))

        futures = [self._pool.submit(one, i) for i in range(len(requests))]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
