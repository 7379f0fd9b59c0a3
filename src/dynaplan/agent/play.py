"""One episode in the terminal: a person plays (or watches the expert or a seeded random player)
with the text observation and the current plan on screen, then a summary.

The game loop only; `dynaplan play` in cli.py parses options and prints. No files are written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from dynaplan.agent.protocol import parse_output
from dynaplan.envs import ENV_NAMES, make_env

PLAY_POLICIES: tuple[str, ...] = ("expert", "random", "human")
HUMAN_HELP = (
    "Type an action (its name, any case, or its number in the list), 'plan TEXT' to write a new "
    "plan, '?' for the actions, or 'quit'."
)


@dataclass
class PlayResult:
    env: str
    policy: str
    seed: int
    steps: int = 0
    total_reward: float = 0.0
    outcome: str = "running"  # terminated | truncated | quit
    plans_written: int = 0
    invalid_moves: int = 0
    achievements: dict[str, int] = field(default_factory=dict)
    progression: float = 0.0
    current_plan: str | None = None


def _human_action(env, read_line: Callable[[str], str], console: Console, result: PlayResult) -> str | None:
    """Ask until the person names an action (returned) or quits (None); plans update the result."""
    names = env.action_names
    while True:
        try:
            line = read_line("action> ").strip()
        except EOFError:
            return None
        if line.lower() in ("q", "quit", "exit"):
            return None
        if line in ("?", "help"):
            console.print(HUMAN_HELP)
            console.print(", ".join(f"{i}: {name}" for i, name in enumerate(names)))
            continue
        if line.lower().startswith("plan "):
            plan = line[5:].strip()
            if plan:
                result.current_plan = plan
                result.plans_written += 1
                console.print(f"[cyan]New plan:[/] {plan}")
            continue
        if line.isdigit() and int(line) < len(names):
            return names[int(line)]
        parsed = parse_output(line, names)
        if parsed.action is not None:
            return parsed.action
        console.print(f"[red]not an action:[/] {line!r}. {HUMAN_HELP}")


def play(
    env_name: str,
    policy: str,
    seed: int,
    *,
    env_kwargs: dict[str, Any] | None = None,
    max_steps: int | None = None,
    read_line: Callable[[str], str] = input,
    console: Console | None = None,
    show: bool = True,
) -> PlayResult:
    """Play one episode; ValueError for an unknown env or policy (before anything starts)."""
    if env_name not in ENV_NAMES:
        raise ValueError(f"unknown env {env_name!r}; expected one of {', '.join(ENV_NAMES)}")
    if policy not in PLAY_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(PLAY_POLICIES)}")
    console = console or Console()
    env_kwargs = dict(env_kwargs or {})
    if max_steps is not None:
        env_kwargs["max_steps"] = max_steps
    env = make_env(env_name, **env_kwargs)
    result = PlayResult(env=env_name, policy=policy, seed=seed)
    teacher = None
    if policy == "expert":
        from dynaplan.teachers import make_teacher

        extra = {"k": env.k} if env_name == "pogs" else {}
        teacher = make_teacher(env_name, seed=seed, **extra)
    rng = np.random.default_rng(seed)

    observation, info = env.reset(seed=seed)
    if teacher is not None:
        teacher.reset(observation, info)
    if policy == "human" and show:
        console.print(Panel(env.rules, title="Rules"))
        console.print(HUMAN_HELP)
    while True:
        if show:
            plan_line = result.current_plan or "You have no plan yet."
            console.print(Panel(f"{observation}\n\n[cyan]Current plan:[/] {plan_line}", title=f"{env_name} step {result.steps}"))
        if policy == "human":
            action = _human_action(env, read_line, console, result)
            if action is None:
                result.outcome = "quit"
                break
        elif policy == "expert":
            step = teacher.act(observation, info)
            action = step.action
            if step.plan is not None:
                result.current_plan = step.plan
                result.plans_written += 1
                if show:
                    console.print(f"[cyan]New plan:[/] {step.plan}")
        else:
            action = env.action_names[int(rng.integers(len(env.action_names)))]
        observation, reward, terminated, truncated, info = env.step(action)
        result.steps += 1
        result.total_reward += float(reward)
        result.invalid_moves += env_name == "pogs" and reward < 0
        if show:
            console.print(f"[bold]{action}[/] -> reward {reward:+g}")
        if terminated or truncated:
            result.outcome = "terminated" if terminated else "truncated"
            break
    result.achievements = dict(info["achievements"])
    result.progression = float(info["progression"])
    return result


def summary_table(result: PlayResult) -> Table:
    table = Table(title=f"{result.env}, {result.policy} policy, seed {result.seed}")
    table.add_column("", style="bold")
    table.add_column("value")
    table.add_row("steps", str(result.steps))
    table.add_row("ended", result.outcome)
    table.add_row("total reward", f"{result.total_reward:g}")
    table.add_row("progression", f"{result.progression:.3f}")
    table.add_row("plans written", str(result.plans_written))
    if result.env == "pogs":
        table.add_row("invalid moves", str(result.invalid_moves))
    unlocked = ", ".join(f"{name} (step {step})" for name, step in result.achievements.items())
    table.add_row(f"achievements ({len(result.achievements)})", unlocked or "none")
    return table
