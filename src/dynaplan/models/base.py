"""The one interface every model backend implements (hf, openai, vllm).

A backend turns a batch of chat prompts into answers and reports, for every answer, the exact
prompt token ids, the generated token ids and their log-probs, so PPO trains on exactly the
tokens that were sampled. No env or planning logic here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 96


@dataclass(frozen=True)
class GenerationRequest:
    """One chat prompt. `prefix` is forced text at the start of the answer (e.g. "<plan>" for
    every-k planning); its tokens count as prompt, not as generated. `forbid_plan` bans the
    "<plan>" opening for this answer."""

    messages: list[dict[str, str]]
    prefix: str = ""
    forbid_plan: bool = False


@dataclass
class Generation:
    text: str  # the whole answer, prefix included
    token_ids: list[int]  # generated tokens only (after the prompt and the forced prefix)
    logprobs: list[float]  # log-prob of each generated token under the sampling distribution's model
    prompt_token_ids: list[int]  # chat-templated prompt plus the forced prefix
    finish_reason: str = "stop"  # "stop" or "length"
    extra: dict = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def chat_prompt_token_ids(tokenizer, request: GenerationRequest) -> list[int]:
    """The prompt as the model sees it: the chat template with the generation prompt, then the
    forced prefix's tokens (which count as prompt, not as generated)."""
    ids = list(
        tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    if request.prefix:
        ids += tokenizer.encode(request.prefix, add_special_tokens=False)
    return ids


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, seed: int
    ) -> list[Generation]: ...

    def count_tokens(self, text: str) -> int: ...
