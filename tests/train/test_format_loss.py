"""The format loss's answer states: two answers with one state have the same valid next tokens."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dynaplan.agent.protocol import MAX_PLAN_CHARS, format_output, is_valid_prefix, parse_output
from dynaplan.envs.crafter_text import ACTION_NAMES as CRAFTER_ACTIONS
from dynaplan.train.format_loss import answer_state

POGS_ACTIONS = tuple(str(i) for i in range(20))
PIECES = ["<", "</", "</plan>", "</plan>\n", "plan", ">", ">\n", "\n", "\n\n", " ", "x", "Move", " West", "Do", "1", "7", "<plan>", "ake"]


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    actions=st.sampled_from([CRAFTER_ACTIONS, POGS_ACTIONS]),
    plan=st.none() | st.text(alphabet=st.characters(blacklist_characters="<"), min_size=1, max_size=MAX_PLAN_CHARS + 50).filter(str.strip),
    token=st.sampled_from(PIECES) | st.text(max_size=6),
)
def test_an_answer_and_its_state_have_the_same_valid_next_tokens(data, actions, plan, token):
    answer = format_output(data.draw(st.sampled_from(actions)), plan)
    so_far = answer[: data.draw(st.integers(0, len(answer)))]
    kind, rep = answer_state(so_far)
    assert kind in {"head", "plan", "tail", "exact"}
    assert is_valid_prefix(so_far + token, actions) == is_valid_prefix(rep + token, actions)
    assert parse_output(so_far, actions).valid == parse_output(rep, actions).valid


def test_states_merge_plan_texts_but_not_what_decides_validity():
    assert answer_state("<plan>\nGet wood") == answer_state("<plan>\nFind water, then sleep.\n")
    assert answer_state("<plan>\n") != answer_state("<plan>\nx")  # blank: '</plan>' would close an empty plan
    assert answer_state("<plan>\nGet wood\n</plan>\nMo") == answer_state("<plan>\nrest\n</plan>\nMo")
    assert answer_state("Mo") != answer_state("<plan>\nrest\n</plan>\nMo")
    assert answer_state("<plan>\n" + "x" * MAX_PLAN_CHARS)[0] == "exact"  # near the length limit: its own state
