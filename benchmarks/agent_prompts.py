"""Agent-style prompts for the model benchmarks: real Crafter observations (one per env seed)
under the dynamic-planning system prompt, as the evaluation loop builds them. They can be saved
to / loaded from JSON, for machines without crafter."""

from __future__ import annotations

import json
from pathlib import Path

from dynaplan.models.base import GenerationRequest


def crafter_requests(n: int, mode: str = "dynamic", first_seed: int = 1_000_000) -> list[GenerationRequest]:
    from dynaplan.agent.prompts import build_messages
    from dynaplan.envs import make_env

    env = make_env("crafter")
    requests = []
    for i in range(n):
        observation, _info = env.reset(seed=first_seed + i)
        messages = build_messages(rules=env.rules, mode=mode, observation=observation, history_len=2)
        requests.append(GenerationRequest(messages=messages))
    return requests


def load_or_build(n: int, path: str | None) -> list[GenerationRequest]:
    if path and Path(path).is_file():
        return [GenerationRequest(messages=m) for m in json.loads(Path(path).read_text())][:n]
    requests = crafter_requests(n)
    if path:
        Path(path).write_text(json.dumps([r.messages for r in requests]))
    return requests
