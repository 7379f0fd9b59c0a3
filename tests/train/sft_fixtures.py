"""Small teacher datasets for the SFT tests: step records built with the shared prompt builder
(dynamic mode, the teacher's plans at random intervals), written as validated Parquet shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dynaplan.agent.prompts import Turn, build_messages
from dynaplan.agent.protocol import format_output
from dynaplan.data.dataset import write_json_atomic, write_shard
from dynaplan.data.schema import to_table

CRAFTER_ACTIONS = ("Noop", "Move West", "Move East", "Move North", "Move South", "Do")
RULES = {
    "crafter": "You play Crafter. Actions: " + ", ".join(CRAFTER_ACTIONS) + ".",
    "pogs": "You search a graph for the target node. Actions: the id of a neighbouring node.",
}


def teacher_rows(env: str, episode: int, steps: int, seed: int = 0, history_len: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed * 1000 + episode + (0 if env == "crafter" else 500))
    rows: list[dict] = []
    history: list[Turn] = []
    plan: str | None = None
    next_plan = 0
    for step in range(steps):
        if env == "crafter":
            action = CRAFTER_ACTIONS[int(rng.integers(len(CRAFTER_ACTIONS)))]
            observation = f"You see a tree {int(rng.integers(1, 5))} steps west. Health 9/9."
        else:
            action = str(int(rng.integers(0, 20)))
            observation = f"You are at node {int(rng.integers(0, 20))}. Target node: 7. Neighbours: {action}, 3."
        messages = build_messages(
            rules=RULES[env], mode="dynamic", observation=observation, history=history,
            current_plan=plan, history_len=history_len,
        )
        planned = step == next_plan
        new_plan = f"Head for the target, step {step}, then keep going." if planned else None
        if planned:
            next_plan = step + int(rng.integers(2, 6))
        rows.append(
            {
                "episode_id": f"{env}-{episode}",
                "env": env,
                "seed": episode,
                "step": step,
                "messages": json.dumps(messages, sort_keys=True, separators=(",", ":")),
                "target": format_output(action, new_plan),
                "action": action,
                "planned": planned,
                "plan_text": new_plan,
                "plan_tokens": 12 if planned else 0,
                "reward": 0.0,
                "terminated": False,
                "truncated": step == steps - 1,
                "achievements": "{}",
                "teacher": f"{env}_expert",
                "plan_interval": 3 if planned else 0,
                "variant": "dynamic",
                "observation": observation,
                "history": json.dumps([[t.observation, t.action] for t in history[-history_len:]]),
                "current_plan": plan,
                "feedback": None,
            }
        )
        history.append(Turn(observation, action))
        if planned:
            plan = new_plan
    return rows


def write_teacher_dataset(root: Path, episodes: int = 4, steps: int = 6, validated: bool = True) -> tuple[Path, Path]:
    """(data dir, validation report) under `root`."""
    data_dir = root / "data" / "teacher"
    for env in ("crafter", "pogs"):
        for episode in range(episodes):
            write_shard(to_table(teacher_rows(env, episode, steps)), data_dir / f"{env}-{episode:03d}.parquet")
    report = root / "reports" / "validate" / "summary.json"
    write_json_atomic({"success": validated, "rows": 2 * episodes * steps}, report)
    return data_dir, report
