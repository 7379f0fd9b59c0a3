"""Agent-style prompts for the model benchmarks: real Crafter observations (one per env seed)
under the dynamic-planning system prompt, as the evaluation loop builds them."""

from __future__ import annotations

from dynaplan.agent.prompts import build_messages
from dynaplan.envs import make_env
from dynaplan.models.base import GenerationRequest


def crafter_requests(n: int, mode: str = "dynamic", first_seed: int = 1_000_000) -> list[GenerationRequest]:
    env = make_env("crafter")
    requests = []
    for i in range(n):
        observation, _info = env.reset(seed=first_seed + i)
        messages = build_messages(rules=env.rules, mode=mode, observation=observation, history_len=2)
        requests.append(GenerationRequest(messages=messages))
    return requests
