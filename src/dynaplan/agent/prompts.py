"""The one prompt builder that data generation, SFT, PPO and evaluation all share.

Pure functions: env rules text, planning mode, history, current plan and observation in, a chat
message list out. It must not touch an env, a model or a file; a tokenizer enters only as an
optional token-counting callable for the budget.

Layout (DESIGN.md section 4): the system message is the game's rules plus the planning
instruction and never changes within an episode, so its KV cache can be computed once (vLLM's
prefix caching, our hf backend's cache reuse). The user message holds the last `history_len`
observations and actions, then the current plan, then the current observation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

PlanningMode = Literal["dynamic", "every_k", "never", "always"]
PLANNING_MODES: tuple[str, ...] = ("dynamic", "every_k", "never", "always")

NO_PLAN = "You have no plan yet."
INVALID_FEEDBACK = "Your previous output did not contain a valid action. Defaulted to action: {action}"


@dataclass(frozen=True)
class Turn:
    """One past step as it appears in the history: what was seen, then what was done."""

    observation: str
    action: str


def planning_instruction(mode: str, k: int = 4) -> str:
    """The part of the system prompt that says when (and whether) to write a plan."""
    action_line = "Then output exactly one action from the list above, and nothing else."
    if mode == "dynamic":
        return (
            "Planning: you may write a new plan before your action, inside <plan>...</plan>. "
            "Write one when you have no plan yet or when the current plan is outdated or wrong; "
            "otherwise do not repeat the plan and just act. A plan says what you will do next "
            "and why, in a few short sentences. Planning costs time, so plan only when it helps. "
            + action_line
        )
    if mode == "every_k":
        if k < 1:
            raise ValueError(f"every_k planning needs k >= 1, got k={k}")
        return (
            f"Planning: every {k} steps (at steps 0, {k}, {2 * k}, ...) you write a new plan "
            "inside <plan>...</plan> before your action; on the other steps you follow the "
            "current plan without writing a new one. " + action_line
        )
    if mode == "never":
        return "Do not write plans. Output exactly one action from the list above, and nothing else."
    if mode == "always":
        return (
            "Planning: at every step, first write a plan inside <plan>...</plan> that says what you "
            "will do next and why. " + action_line
        )
    raise ValueError(f"unknown planning mode {mode!r}; expected one of {', '.join(PLANNING_MODES)}")


def system_prompt(rules: str, mode: str, k: int = 4) -> str:
    return f"{rules.strip()}\n\n{planning_instruction(mode, k)}"


def user_prompt(
    history: Sequence[Turn],
    current_plan: str | None,
    observation: str,
    feedback: str | None = None,
) -> str:
    parts: list[str] = []
    if history:
        lines = ["Recent history:"]
        for turn in history:
            lines.append(f"Observation:\n{turn.observation.strip()}\nAction: {turn.action}")
        parts.append("\n".join(lines))
    # The plan stays in the prompt however old it is: the decision to replan is conditioned on
    # the last plan (p_{t-1}), which the history window alone would lose after history_len steps.
    parts.append(f"Current plan: {current_plan.strip()}" if current_plan else NO_PLAN)
    current = observation.strip()
    if feedback:
        current = f"{feedback.strip()}\n{current}"
    parts.append(f"Current observation:\n{current}")
    return "\n\n".join(parts)


def build_messages(
    *,
    rules: str,
    mode: str,
    observation: str,
    history: Sequence[Turn] = (),
    current_plan: str | None = None,
    history_len: int = 16,
    k: int = 4,
    feedback: str | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> list[dict[str, str]]:
    """Chat messages for one decision.

    Keeps the last `history_len` turns; if `max_tokens` and `count_tokens` are given, drops the
    oldest turns until the system and user text fit (the rules, plan and current observation are
    never dropped). Raises ValueError for a negative history length.
    """
    if history_len < 0:
        raise ValueError(f"history_len must be >= 0, got {history_len}")
    system = system_prompt(rules, mode, k)
    window = list(history)[-history_len:] if history_len else []
    while True:
        user = user_prompt(window, current_plan, observation, feedback)
        if max_tokens is None or count_tokens is None or not window:
            break
        if count_tokens(system) + count_tokens(user) <= max_tokens:
            break
        window = window[1:]
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]
