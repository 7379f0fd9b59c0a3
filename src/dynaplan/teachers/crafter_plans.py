"""Natural-language plan styles for the Crafter expert: one sub-goal list, many wordings.

Each style turns the same facts (the next two or three sub-goals with where and why, the player's
inventory and vitals) into a differently worded plan; it must not add facts of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SubGoal:
    """One step of a plan: `text` says what (with where, e.g. 'collect wood from the tree 2 steps
    east'), `why` the reason ('a table costs 2 wood'); `key` names the goal for tests and logs."""

    key: str
    text: str
    why: str


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(texts: Sequence[str], last: str = "and") -> str:
    if len(texts) <= 1:
        return "".join(texts)
    return ", ".join(texts[:-1]) + f" {last} " + texts[-1]


def _style_next_list(goals, inventory, vitals):
    return f"{_cap(inventory)}. Next: {_join([g.text for g in goals], 'then')}. Why: {goals[0].why}."


def _style_numbered(goals, inventory, vitals):
    steps = " ".join(f"{i + 1}) {g.text}." for i, g in enumerate(goals))
    return f"Plan: {steps} First because {goals[0].why}."


def _style_priority(goals, inventory, vitals):
    rest = _join([g.text for g in goals[1:]])
    tail = f" After that I will {rest}." if rest else ""
    return f"My priority is to {goals[0].text} because {goals[0].why}.{tail}"


def _style_status_first(goals, inventory, vitals):
    return f"Status: {vitals}; {inventory}. I will {goals[0].text}, since {goals[0].why}." + (
        f" Then {_join([g.text for g in goals[1:]], 'and then')}." if len(goals) > 1 else ""
    )


def _style_short(goals, inventory, vitals):
    return " -> ".join(_cap(g.text) for g in goals) + "."


def _style_because_each(goals, inventory, vitals):
    return " ".join(f"{_cap(g.text)} ({g.why})." for g in goals)


def _style_first_then(goals, inventory, vitals):
    text = f"First, {goals[0].text}."
    for word, goal in zip(("Then", "Finally"), goals[1:]):
        text += f" {word}, {goal.text}."
    return text + f" Reason: {goals[0].why}."


def _style_goal_reason(goals, inventory, vitals):
    return f"Goal: {goals[0].text}. Reason: {goals[0].why}. Afterwards: " + (
        _join([g.text for g in goals[1:]], "then") or "keep exploring"
    ) + "."


def _style_inventory_driven(goals, inventory, vitals):
    return f"{_cap(inventory)}; {goals[0].why}, so I should {goals[0].text}." + (
        f" Once that is done I can {_join([g.text for g in goals[1:]])}." if len(goals) > 1 else ""
    )


def _style_checklist(goals, inventory, vitals):
    return "To do: " + "; ".join(f"[ ] {g.text}" for g in goals) + "."


def _style_question(goals, inventory, vitals):
    return f"What do I need now? {_cap(goals[0].why)}. So: {goals[0].text}" + (
        f", and after it {_join([g.text for g in goals[1:]])}." if len(goals) > 1 else "."
    )


def _style_we(goals, inventory, vitals):
    return f"Let's {goals[0].text}; {goals[0].why}." + (
        f" Next up: {_join([g.text for g in goals[1:]], 'then')}." if len(goals) > 1 else ""
    )


def _style_short_term_long_term(goals, inventory, vitals):
    later = _join([g.text for g in goals[1:]]) or "keep gathering resources"
    return f"Short term: {goals[0].text} ({goals[0].why}). Longer term: {later}."


def _style_imperative(goals, inventory, vitals):
    return " ".join(f"{_cap(g.text)}." for g in goals) + f" ({_cap(goals[0].why)}.)"


def _style_vitals_first(goals, inventory, vitals):
    return f"I am at {vitals}. {_cap(inventory)}. Immediate step: {goals[0].text}." + (
        f" Following steps: {_join([g.text for g in goals[1:]], 'then')}." if len(goals) > 1 else ""
    )


def _style_strategy(goals, inventory, vitals):
    return f"Strategy: {_join([g.text for g in goals], 'and finally')}. The first step matters because {goals[0].why}."


def _style_bullets(goals, inventory, vitals):
    return "Plan:\n" + "\n".join(f"- {g.text} ({g.why})" for g in goals)


def _style_narrative(goals, inventory, vitals):
    text = f"Since {goals[0].why}, I am going to {goals[0].text}."
    if len(goals) > 1:
        text += f" With that done, I will {goals[1].text}"
        text += f" and then {goals[2].text}." if len(goals) > 2 else "."
    return text


PlanStyle = Callable[[Sequence[SubGoal], str, str], str]
PLAN_STYLES: tuple[PlanStyle, ...] = (
    _style_next_list,
    _style_numbered,
    _style_priority,
    _style_status_first,
    _style_short,
    _style_because_each,
    _style_first_then,
    _style_goal_reason,
    _style_inventory_driven,
    _style_checklist,
    _style_question,
    _style_we,
    _style_short_term_long_term,
    _style_imperative,
    _style_vitals_first,
    _style_strategy,
    _style_bullets,
    _style_narrative,
)

# The names `generate.crafter_plan_styles` takes: each style function's name without `_style_`.
PLAN_STYLE_NAMES: tuple[str, ...] = tuple(style.__name__.removeprefix("_style_") for style in PLAN_STYLES)


def style_indices(names: Sequence[str] | None = None) -> tuple[int, ...]:
    """Indices into PLAN_STYLES of the named styles, in PLAN_STYLES order; every style when
    `names` is empty or None (the teacher then draws exactly as it does with no selection)."""
    if not names:
        return tuple(range(len(PLAN_STYLES)))
    unknown = [name for name in names if name not in PLAN_STYLE_NAMES]
    if unknown:
        raise ValueError(f"unknown Crafter plan style(s) {', '.join(map(repr, unknown))}; expected names from: {', '.join(PLAN_STYLE_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"Crafter plan styles listed twice in {list(names)}")
    chosen = set(names)
    return tuple(i for i, name in enumerate(PLAN_STYLE_NAMES) if name in chosen)


def describe_inventory(inventory: dict[str, int]) -> str:
    items = [f"{count} {name.replace('_', ' ')}" for name, count in inventory.items() if count]
    return "I have " + _join(items) if items else "I have nothing yet"


def describe_vitals(status: dict[str, int]) -> str:
    return ", ".join(f"{name} {status.get(name, 0)}/9" for name in ("health", "food", "drink", "energy"))


def write_plan(style: int, goals: Sequence[SubGoal], inventory: dict[str, int], status: dict[str, int]) -> str:
    """The plan text in style number `style` (0..len(PLAN_STYLES)-1) for 1 to 3 sub-goals."""
    if not goals:
        raise ValueError("a plan needs at least one sub-goal")
    # '<' would end the plan in the output protocol's regex; no style writes one, keep it so.
    return PLAN_STYLES[style](goals, describe_inventory(inventory), describe_vitals(status)).replace("<", "")
