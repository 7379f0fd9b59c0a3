"""The `vllm` backend: in-process vLLM (GPU machines with the `gpu` extra) with LoRA adapters as
LoRARequests and automatic prefix caching for the shared system prompt.

vLLM is imported lazily inside the class: importing dynaplan.models must never import it (it
pins its own torch and cannot be installed in the CPU environment).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynaplan.models.base import Generation, GenerationRequest, SamplingParams, chat_prompt_token_ids
from dynaplan.models.hf import plan_opening_token_ids, row_seed

INSTALL_HINT = (
    "the vllm backend needs vLLM, which is only installed on GPU machines: "
    "pip install 'dynaplan[gpu]' there (or use backend 'hf' on CPU, or 'openai' against `vllm serve`)"
)


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        adapter_dir: str | None = None,
        *,
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.85,
        max_lora_rank: int = 64,
        enable_prefix_caching: bool = True,
        **engine_kwargs: Any,
    ):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise ImportError(f"{INSTALL_HINT} ({err})") from err
        self._vllm = vllm
        self.model_dir = str(model_dir)
        self.llm = vllm.LLM(
            model=self.model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_lora=adapter_dir is not None,
            max_lora_rank=max_lora_rank,
            enable_prefix_caching=enable_prefix_caching,
            **engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.lora = None
        if adapter_dir is not None:
            self.lora = LoRARequest(Path(adapter_dir).name, 1, str(Path(adapter_dir).resolve()))
        self._banned: list[int] | None = None

    def set_lora(self, adapter_dir: str | None) -> None:
        """Switch to another LoRA adapter (PPO reloads the policy's adapter every iteration);
        each new path gets a fresh LoRA id so vLLM does not serve a stale cached adapter."""
        from vllm.lora.request import LoRARequest

        if adapter_dir is None:
            self.lora = None
            return
        self._lora_counter = getattr(self, "_lora_counter", 1) + 1
        path = Path(adapter_dir).resolve()
        self.lora = LoRARequest(f"{path.name}-{self._lora_counter}", self._lora_counter, str(path))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        return chat_prompt_token_ids(self.tokenizer, request)

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, seed: int
    ) -> list[Generation]:
        vllm = self._vllm
        prompts, params = [], []
        for i, request in enumerate(requests):
            prompts.append({"prompt_token_ids": self.prompt_token_ids(request)})
            bias = None
            if request.forbid_plan and not request.prefix.strip():
                if self._banned is None:
                    self._banned = plan_opening_token_ids(self.tokenizer)
                bias = {t: -100.0 for t in self._banned}
            params.append(
                vllm.SamplingParams(
                    temperature=float(sampling.temperature),
                    top_p=float(sampling.top_p),
                    max_tokens=int(sampling.max_new_tokens),
                    seed=row_seed(seed, i),
                    logprobs=0,  # the sampled token's log-prob only
                    logit_bias=bias,
                )
            )
        outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        results = []
        for request, prompt, out in zip(requests, prompts, outputs):
            completion = out.outputs[0]
            token_ids = list(completion.token_ids)
            logprobs = []
            for token, entry in zip(token_ids, completion.logprobs or []):
                logprobs.append(float(entry[token].logprob) if token in entry else math.nan)
            if len(logprobs) != len(token_ids):
                logprobs = [math.nan] * len(token_ids)
            results.append(
                Generation(
                    text=request.prefix + completion.text,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    prompt_token_ids=prompt["prompt_token_ids"],
                    finish_reason="length" if completion.finish_reason == "length" else "stop",
                )
            )
        return results
