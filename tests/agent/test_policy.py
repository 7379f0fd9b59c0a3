"""LLMPolicy behaviour: planning modes, plan keeping, injected human plans, invalid answers.

The backend here is a scripted stand-in for the model's text (what it answers is the input
under test); the real tiny model is exercised in tests/train/test_rollout.py.
"""

from __future__ import annotations

from dynaplan.agent.policy import InjectedPlan, LLMPolicy, RandomPolicy, load_plans_file
from dynaplan.agent.prompts import NO_PLAN
from dynaplan.models.base import Generation, GenerationRequest, SamplingParams

ACTIONS = ("Noop", "Move West", "Do")


class ScriptedBackend:
    """Answers from a script: each answer is a function of the request (prefix honoured)."""

    name = "scripted"

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[GenerationRequest] = []

    def generate(self, requests, sampling, seed):
        out = []
        for request in requests:
            self.requests.append(request)
            body = self.answer(request)
            text = request.prefix + body
            out.append(Generation(text=text, token_ids=list(range(len(body.split()))), logprobs=[0.0] * len(body.split()), prompt_token_ids=[1, 2, 3]))
        return out

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def _policy(backend, **kwargs) -> LLMPolicy:
    defaults = dict(action_names=ACTIONS, default_action="Noop", rules="Rules.", history_len=2, sampling=SamplingParams(temperature=0))
    defaults.update(kwargs)
    policy = LLMPolicy(backend, **defaults)
    policy.reset(1)
    policy.start_episode(0, 7, "obs", {})
    return policy


def _run(policy, steps, info=None):
    return [policy.act([0], [f"observation {t}"], [dict(info or {}, history_text=f"seen {t}")])[0] for t in range(steps)]


def test_every_k_forces_the_plan_opening_on_steps_0_k_2k_and_forbids_it_elsewhere():
    backend = ScriptedBackend(lambda r: "go west\n</plan>\nMove West" if r.prefix else "Do")
    decisions = _run(_policy(backend, mode="every_k", k=3), 10)
    planned_steps = [t for t, d in enumerate(decisions) if d.plan is not None]
    assert planned_steps == [0, 3, 6, 9]
    assert [bool(r.prefix) for r in backend.requests] == [t % 3 == 0 for t in range(10)]
    assert all(r.forbid_plan for t, r in enumerate(backend.requests) if t % 3)
    assert all(d.valid for d in decisions)


def test_never_forbids_and_always_forces_plans():
    never = ScriptedBackend(lambda r: "Do")
    _run(_policy(never, mode="never"), 3)
    assert all(r.forbid_plan and not r.prefix for r in never.requests)
    always = ScriptedBackend(lambda r: "x\n</plan>\nDo")
    decisions = _run(_policy(always, mode="always"), 3)
    assert all(d.plan == "x" for d in decisions)


def test_dynamic_plan_stays_in_the_prompt_until_replaced():
    answers = iter(["<plan>\nfind a tree\n</plan>\nMove West"] + ["Do"] * 5 + ["<plan>\nplace a table\n</plan>\nNoop"])
    backend = ScriptedBackend(lambda r: next(answers))
    decisions = _run(_policy(backend, mode="dynamic", history_len=1), 7)
    prompts = [r.messages[1]["content"] for r in backend.requests]
    assert NO_PLAN in prompts[0]
    # Older than the one-step history window, the plan is still shown.
    assert all("Current plan: find a tree" in p for p in prompts[1:7])
    assert decisions[6].current_plan == "place a table"
    assert decisions[0].plan_tokens == len("<plan>\nfind a tree\n</plan>".split())
    assert decisions[3].plan_tokens == 0


def test_unparseable_answer_plays_default_counts_fallback_and_warns_next_prompt():
    answers = iter(["<plan>\nnever closed", "Dance wildly", "Do"])
    backend = ScriptedBackend(lambda r: next(answers))
    decisions = _run(_policy(backend), 3)
    assert [d.action for d in decisions] == ["Noop", "Noop", "Do"]
    assert [d.fallback for d in decisions] == [True, True, False]
    assert decisions[0].plan_tokens == 3  # an unclosed plan still spent its tokens
    assert "did not contain a valid action" in backend.requests[1].messages[1]["content"]
    assert "did not contain a valid action" in backend.requests[2].messages[1]["content"]


def test_injected_human_plans_fill_the_plan_block_until_their_achievement(tmp_path):
    path = tmp_path / "plans.yaml"
    path.write_text("- plan: Collect wood from the nearest tree.\n  until: collect_wood\n- plan: Place a table.\n  until: place_table\n")
    plans = load_plans_file(path)
    assert plans == [InjectedPlan("Collect wood from the nearest tree.", "collect_wood"), InjectedPlan("Place a table.", "place_table")]
    backend = ScriptedBackend(lambda r: "<plan>\nmy own idea\n</plan>\nDo")
    policy = _policy(backend, plans=plans)
    policy.act([0], ["o"], [{"achievements": {}, "history_text": ""}])
    policy.act([0], ["o"], [{"achievements": {"collect_wood": 3}, "history_text": ""}])
    prompts = [r.messages[1]["content"] for r in backend.requests]
    assert "Current plan: Collect wood from the nearest tree." in prompts[0]
    assert "Current plan: Place a table." in prompts[1]


def test_policy_seeds_differ_per_call_and_repeat_across_runs():
    seeds = []

    class SeedRecorder(ScriptedBackend):
        def generate(self, requests, sampling, seed):
            seeds.append(seed)
            return super().generate(requests, sampling, seed)

    _run(_policy(SeedRecorder(lambda r: "Do"), seed=5), 3)
    first = list(seeds)
    seeds.clear()
    _run(_policy(SeedRecorder(lambda r: "Do"), seed=5), 3)
    assert seeds == first and len(set(first)) == 3


def test_random_policy_depends_on_the_episode_seed_not_the_slot():
    policy = RandomPolicy(ACTIONS, seed=1)
    policy.reset(2)
    policy.start_episode(0, 42, "", {})
    policy.start_episode(1, 42, "", {})
    a = [d.action for d in policy.act([0, 1], ["", ""], [{}, {}])]
    assert a[0] == a[1]
