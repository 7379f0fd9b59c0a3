"""The shared prompt builder: modes, history window, the current plan that never ages out, the
feedback line and the token budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaplan.agent.prompts import INVALID_FEEDBACK, NO_PLAN, PLANNING_MODES, Turn, build_messages
from dynaplan.envs.crafter_text import crafter_rules
from dynaplan.envs.pogs import pogs_rules

RULES = pogs_rules(20, 2, 30)


def turns(n: int) -> list[Turn]:
    return [Turn(observation=f"obs {i}", action=str(i % 20)) for i in range(n)]


def test_messages_are_one_system_and_one_user():
    messages = build_messages(rules=RULES, mode="dynamic", observation="now")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith(RULES)


@pytest.mark.parametrize("mode", PLANNING_MODES)
def test_system_message_is_constant_within_an_episode(mode):
    first = build_messages(rules=RULES, mode=mode, observation="a", history=[], current_plan=None)
    later = build_messages(rules=RULES, mode=mode, observation="b", history=turns(30), current_plan="go", feedback="x")
    assert first[0] == later[0]


def test_each_mode_has_its_own_instruction():
    systems = {mode: build_messages(rules=RULES, mode=mode, observation="o", k=4)[0]["content"] for mode in PLANNING_MODES}
    assert len(set(systems.values())) == len(PLANNING_MODES)
    assert "<plan>" in systems["dynamic"] and "<plan>" in systems["always"]
    assert "every 4 steps" in systems["every_k"]
    assert "Do not write plans" in systems["never"]


def test_history_keeps_only_the_last_history_len_turns_in_order():
    user = build_messages(rules=RULES, mode="dynamic", observation="now", history=turns(10), history_len=3)[1]["content"]
    assert "obs 6" not in user
    assert user.index("obs 7") < user.index("obs 8") < user.index("obs 9") < user.index("Current observation:\nnow")


def test_zero_history_len_shows_no_history():
    user = build_messages(rules=RULES, mode="never", observation="now", history=turns(5), history_len=0)[1]["content"]
    assert "Recent history" not in user and "obs 4" not in user


def test_current_plan_survives_however_old_it_is():
    plan = "Explore toward node 9, then backtrack."
    user = build_messages(
        rules=RULES, mode="dynamic", observation="now", history=turns(100), history_len=2, current_plan=plan
    )[1]["content"]
    assert f"Current plan: {plan}" in user
    assert user.index("Current plan:") < user.index("Current observation:")


def test_no_plan_is_said_explicitly():
    user = build_messages(rules=RULES, mode="dynamic", observation="now")[1]["content"]
    assert NO_PLAN in user


def test_feedback_line_opens_the_current_observation():
    feedback = INVALID_FEEDBACK.format(action="Noop")
    user = build_messages(rules=RULES, mode="dynamic", observation="now", feedback=feedback)[1]["content"]
    assert user.endswith(f"Current observation:\n{feedback}\nnow")


def test_token_budget_drops_oldest_turns_first_but_never_plan_or_observation():
    def count_words(text: str) -> int:
        return len(text.split())

    history = turns(16)
    full = build_messages(rules=RULES, mode="dynamic", observation="now", history=history, current_plan="p")
    budget = count_words(full[0]["content"]) + count_words(full[1]["content"]) - 12
    cut = build_messages(
        rules=RULES, mode="dynamic", observation="now", history=history, current_plan="p",
        max_tokens=budget, count_tokens=count_words,
    )
    user = cut[1]["content"]
    assert count_words(cut[0]["content"]) + count_words(user) <= budget
    assert "obs 0\n" not in user and "obs 15" in user
    assert "Current plan: p" in user and user.endswith("Current observation:\nnow")
    tiny = build_messages(
        rules=RULES, mode="dynamic", observation="now", history=history, current_plan="p",
        max_tokens=1, count_tokens=count_words,
    )
    assert "Recent history" not in tiny[1]["content"] and "Current plan: p" in tiny[1]["content"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "sometimes"}, "unknown planning mode"), ({"mode": "every_k", "k": 0}, "k >= 1"),
     ({"mode": "dynamic", "history_len": -1}, "history_len")],
)
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_messages(rules=RULES, observation="o", **kwargs)


@settings(max_examples=100, deadline=None)
@given(
    observation=st.text(min_size=1, max_size=200).filter(str.strip),
    plan=st.none() | st.text(min_size=1, max_size=200).filter(str.strip),
    history=st.lists(st.tuples(st.text(max_size=50), st.sampled_from(["Noop", "Do", "7"])), max_size=20),
    history_len=st.integers(0, 20),
    mode=st.sampled_from(PLANNING_MODES),
)
def test_any_inputs_give_a_prompt_holding_the_plan_and_the_observation(observation, plan, history, history_len, mode):
    messages = build_messages(
        rules=crafter_rules(), mode=mode, observation=observation,
        history=[Turn(o, a) for o, a in history], current_plan=plan, history_len=history_len,
    )
    user = messages[1]["content"]
    assert user.endswith(observation.strip())
    assert (f"Current plan: {plan.strip()}" if plan else NO_PLAN) in user
    assert user.count("\nAction: ") >= min(len(history), history_len)
