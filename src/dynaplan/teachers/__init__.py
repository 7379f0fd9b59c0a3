"""Scripted teachers that play an env and write natural-language plans at random intervals.

Holds the step a teacher returns and `make_teacher`; the teachers themselves live in their own
modules and are imported lazily (the Crafter expert is large and POGS users need not load it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TeacherStep:
    """One teacher decision.

    `plan` is not None exactly on the steps where the teacher writes a new plan, and then
    `plan_interval` is the gap (in steps) it drew until its next plan; both are None otherwise.
    """

    action: str
    plan: str | None = None
    plan_interval: int | None = None


TEACHER_ENVS: tuple[str, ...] = ("crafter", "pogs")


def make_teacher(env_name: str, **kwargs: Any):
    """Build the scripted expert for `env_name` with its keyword settings (`seed=` is required)."""
    if env_name == "crafter":
        from dynaplan.teachers.crafter_expert import CrafterExpert

        return CrafterExpert(**kwargs)
    if env_name == "pogs":
        from dynaplan.teachers.pogs_expert import PogsExpert

        return PogsExpert(**kwargs)
    raise ValueError(f"unknown teacher env {env_name!r}; expected one of {', '.join(TEACHER_ENVS)}")
