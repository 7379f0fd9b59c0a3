"""Policies that act in the text envs: the LLM agent (with its planning modes), random, and the
scripted teachers, all behind one batched interface that the lockstep rollout engine drives.

The LLM policy keeps, per slot (one env of a batch), the history window, the current plan and
the invalid-answer feedback, and turns a batch of observations into one backend call. It must
not step envs or write files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml

from dynaplan.agent.prompts import INVALID_FEEDBACK, PLANNING_MODES, Turn, build_messages
from dynaplan.agent.protocol import PLAN_CLOSE, PLAN_OPEN, format_output, parse_output
from dynaplan.models.base import Backend, Generation, GenerationRequest, SamplingParams


@dataclass
class Decision:
    """What a policy did at one step, with everything evaluation and PPO need to account for it."""

    action: str  # the action played (the env's default when the answer named none)
    plan: str | None  # the new plan written at this step, if any
    valid: bool  # the answer matched the strict output protocol
    fallback: bool  # the answer named no action: the default action was played
    text: str  # the raw answer (prefix included)
    generation: Generation | None = None  # exact tokens and log-probs (LLM policies)
    plan_tokens: int = 0  # tokens spent on the plan block (forced opening included)
    new_tokens: int = 0  # all tokens of the answer (forced prefix included)
    messages: list[dict[str, str]] | None = None  # the prompt (LLM policies)
    current_plan: str | None = None  # the plan in effect after this step


class Policy(Protocol):
    def reset(self, num_slots: int) -> None: ...

    def start_episode(self, slot: int, seed: int, observation: str, info: dict) -> None: ...

    def act(self, slots: Sequence[int], observations: Sequence[str], infos: Sequence[dict]) -> list[Decision]: ...


@dataclass(frozen=True)
class InjectedPlan:
    """A human-written plan, in effect until `until` (an achievement name) is unlocked."""

    text: str
    until: str | None = None


def load_plans_file(path: str | Path) -> list[InjectedPlan]:
    """Read a plans file: a YAML list of {plan: TEXT, until: ACHIEVEMENT} in the order to follow."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plans file not found: {path}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty YAML list of {{plan: ..., until: ...}} entries")
    plans = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("plan"), str) or not entry["plan"].strip():
            raise ValueError(f"{path}: entry {i} must be a mapping with a non-empty 'plan' text, got {entry!r}")
        extra = set(entry) - {"plan", "until"}
        if extra:
            raise ValueError(f"{path}: entry {i} has unknown keys {sorted(extra)}; allowed: plan, until")
        plans.append(InjectedPlan(entry["plan"].strip(), entry.get("until")))
    return plans


@dataclass
class _SlotState:
    history: list[Turn] = field(default_factory=list)
    current_plan: str | None = None
    feedback: str | None = None
    step: int = 0


def _plan_block_text(text: str) -> str:
    """The part of an answer spent on planning: from the opening tag through the closing one
    (all of it when the tag is never closed); empty when the answer does not open with a plan."""
    stripped = text.lstrip()
    if not stripped.startswith(PLAN_OPEN):
        return ""
    end = stripped.find(PLAN_CLOSE)
    return stripped if end < 0 else stripped[: end + len(PLAN_CLOSE)]


class LLMPolicy:
    """The agent: one LLM that answers an action, or a plan and an action, in a planning mode.

    Modes: `dynamic` (the model decides), `every_k` (the "<plan>" opening is forced at steps
    0, k, 2k, ... and forbidden elsewhere), `never` (forbidden), `always` (forced). With
    `plans`, a human-written plan fills the current-plan block until its achievement unlocks.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        action_names: Sequence[str],
        default_action: str | Callable[[dict], str],
        rules: str,
        mode: str = "dynamic",
        k: int = 4,
        history_len: int = 2,
        max_prompt_tokens: int | None = None,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        plans: Sequence[InjectedPlan] | None = None,
    ) -> None:
        if mode not in PLANNING_MODES:
            raise ValueError(f"unknown planning mode {mode!r}; expected one of {', '.join(PLANNING_MODES)}")
        if mode == "every_k" and k < 1:
            raise ValueError(f"every_k planning needs k >= 1, got {k}")
        self.backend = backend
        self.action_names = tuple(action_names)
        self.default_action = default_action
        self.rules = rules
        self.mode = mode
        self.k = k
        self.history_len = history_len
        self.max_prompt_tokens = max_prompt_tokens
        self.sampling = sampling
        self.seed = seed
        self.plans = list(plans or [])
        self._calls = 0
        self._slots: list[_SlotState] = []

    def reset(self, num_slots: int) -> None:
        self._slots = [_SlotState() for _ in range(num_slots)]

    def start_episode(self, slot: int, seed: int, observation: str, info: dict) -> None:
        self._slots[slot] = _SlotState()

    def _default(self, info: dict) -> str:
        return self.default_action(info) if callable(self.default_action) else self.default_action

    def _injected_plan(self, info: dict) -> str | None:
        unlocked = info.get("achievements", {})
        for plan in self.plans:
            if plan.until is None or plan.until not in unlocked:
                return plan.text
        return None

    def _request(self, state: _SlotState, observation: str, info: dict) -> GenerationRequest:
        if self.plans:
            injected = self._injected_plan(info)
            if injected is not None:
                state.current_plan = injected
        messages = build_messages(
            rules=self.rules,
            mode=self.mode,
            observation=observation,
            history=state.history,
            current_plan=state.current_plan,
            history_len=self.history_len,
            k=self.k,
            feedback=state.feedback,
            max_tokens=self.max_prompt_tokens,
            count_tokens=self.backend.count_tokens if self.max_prompt_tokens else None,
        )
        must_plan = self.mode == "always" or (self.mode == "every_k" and state.step % self.k == 0)
        may_plan = self.mode == "dynamic"
        if must_plan:
            return GenerationRequest(messages=messages, prefix=PLAN_OPEN + "\n")
        return GenerationRequest(messages=messages, forbid_plan=not may_plan)

    def act(self, slots: Sequence[int], observations: Sequence[str], infos: Sequence[dict]) -> list[Decision]:
        states = [self._slots[s] for s in slots]
        requests = [self._request(st, obs, info) for st, obs, info in zip(states, observations, infos)]
        # One seed per backend call, derived from the policy seed: the same seeds and batch give
        # the same answers, and no two calls share a sampling stream.
        call_seed = int(np.random.SeedSequence([self.seed, self._calls]).generate_state(1)[0])
        self._calls += 1
        generations = self.backend.generate(requests, self.sampling, call_seed)
        decisions = []
        for state, request, generation, info in zip(states, requests, generations, infos):
            decisions.append(self._decide(state, request, generation, info))
        return decisions

    def _decide(self, state: _SlotState, request: GenerationRequest, generation: Generation, info: dict) -> Decision:
        parsed = parse_output(generation.text, self.action_names)
        fallback = parsed.action is None
        action = self._default(info) if fallback else parsed.action
        if parsed.plan is not None and not (self.plans and self._injected_plan(info) is not None):
            state.current_plan = parsed.plan
        plan_block = _plan_block_text(generation.text)
        prefix_tokens = self.backend.count_tokens(request.prefix) if request.prefix else 0
        decision = Decision(
            action=action,
            plan=parsed.plan,
            valid=parsed.valid,
            fallback=fallback,
            text=generation.text,
            generation=generation,
            plan_tokens=self.backend.count_tokens(plan_block) if plan_block else 0,
            new_tokens=len(generation.token_ids) + prefix_tokens,
            messages=request.messages,
            current_plan=state.current_plan,
        )
        state.feedback = INVALID_FEEDBACK.format(action=action) if fallback else None
        state.history.append(Turn(info.get("history_text", ""), action))
        if len(state.history) > max(self.history_len, 1):
            del state.history[0]
        state.step += 1
        return decision


class RandomPolicy:
    """Uniformly random actions from a seeded generator (the paper's and Crafter's random agent)."""

    def __init__(self, action_names: Sequence[str], seed: int = 0) -> None:
        self.action_names = tuple(action_names)
        self.seed = seed
        self._rngs: list[np.random.Generator] = []

    def reset(self, num_slots: int) -> None:
        self._rngs = [np.random.default_rng() for _ in range(num_slots)]

    def start_episode(self, slot: int, seed: int, observation: str, info: dict) -> None:
        # Seeded per episode from the env seed, so results do not depend on slot assignment.
        self._rngs[slot] = np.random.default_rng([self.seed, seed])

    def act(self, slots: Sequence[int], observations: Sequence[str], infos: Sequence[dict]) -> list[Decision]:
        out = []
        for slot in slots:
            action = self.action_names[int(self._rngs[slot].integers(len(self.action_names)))]
            out.append(Decision(action=action, plan=None, valid=True, fallback=False, text=action))
        return out


class TeacherPolicy:
    """A scripted expert (teachers/) as a policy: its plans and actions as Decisions.

    `count_tokens` (a tokenizer's) makes plan and answer token counts comparable to the LLM's.
    """

    def __init__(
        self,
        env_name: str,
        *,
        seed: int = 0,
        count_tokens: Callable[[str], int] | None = None,
        **teacher_kwargs,
    ) -> None:
        self.env_name = env_name
        self.seed = seed
        self.count_tokens = count_tokens
        self.teacher_kwargs = teacher_kwargs
        self._teachers: list = []
        self._plans: list[str | None] = []

    def reset(self, num_slots: int) -> None:
        self._teachers = [None] * num_slots
        self._plans = [None] * num_slots

    def start_episode(self, slot: int, seed: int, observation: str, info: dict) -> None:
        from dynaplan.teachers import make_teacher

        teacher_seed = int(np.random.SeedSequence([self.seed, seed]).generate_state(1)[0])
        teacher = make_teacher(self.env_name, seed=teacher_seed, **self.teacher_kwargs)
        teacher.reset(observation, info)
        self._teachers[slot] = teacher
        self._plans[slot] = None

    def act(self, slots: Sequence[int], observations: Sequence[str], infos: Sequence[dict]) -> list[Decision]:
        out = []
        for slot, obs, info in zip(slots, observations, infos):
            step = self._teachers[slot].act(obs, info)
            text = format_output(step.action, step.plan)
            if step.plan is not None:
                self._plans[slot] = step.plan
            count = self.count_tokens
            plan_tokens = count(_plan_block_text(text)) if (count and step.plan) else 0
            out.append(
                Decision(
                    action=step.action,
                    plan=step.plan,
                    valid=True,
                    fallback=False,
                    text=text,
                    plan_tokens=plan_tokens,
                    new_tokens=count(text) if count else 0,
                    current_plan=self._plans[slot],
                )
            )
        return out
