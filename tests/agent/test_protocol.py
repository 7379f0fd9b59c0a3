"""The output protocol: strict validation, lenient parsing, never an exception (property tests
with hypothesis over the Crafter and POGS action sets, plus the named sloppy-answer cases)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaplan.agent.protocol import (
    MAX_PLAN_CHARS,
    ParsedOutput,
    format_output,
    is_valid_prefix,
    parse_output,
    target_regex,
)
from dynaplan.envs.crafter_text import ACTION_NAMES as CRAFTER_ACTIONS

POGS_ACTIONS = tuple(str(i) for i in range(20))
ACTION_SETS = st.sampled_from([CRAFTER_ACTIONS, POGS_ACTIONS])
PLANS = st.text(alphabet=st.characters(blacklist_characters="<"), min_size=1, max_size=MAX_PLAN_CHARS).filter(
    lambda text: text.strip()
)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), actions=ACTION_SETS, plan=st.none() | PLANS)
def test_format_then_parse_is_the_identity(data, actions, plan):
    action = data.draw(st.sampled_from(actions))
    text = format_output(action, plan)
    assert parse_output(text, actions) == ParsedOutput(plan.strip() if plan else None, action, True)
    assert target_regex(actions).fullmatch(text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300), actions=ACTION_SETS)
def test_arbitrary_text_never_raises_and_gives_a_known_action_or_none(text, actions):
    parsed = parse_output(text, actions)
    assert parsed.action is None or parsed.action in actions
    assert not parsed.valid or parsed.action is not None
    assert parsed.plan is None or (parsed.plan == parsed.plan.strip() and parsed.plan)
    if parsed.valid:  # valid means canonical: formatting what was parsed gives the text back
        assert format_output(parsed.action, parsed.plan) == text or text.startswith("<plan>")


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from(["<plan>", "</plan>", "\n", " ", "Move West", "Do", "7", "17", "noop", "plan", "<", ">", "."])
        | st.text(max_size=8),
        max_size=12,
    ),
    actions=ACTION_SETS,
)
def test_tag_soup_never_raises(pieces, actions):
    text = "".join(pieces)
    parsed = parse_output(text, actions)
    assert parsed.action is None or parsed.action in actions
    if parsed.valid:
        assert target_regex(actions).fullmatch(text)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), actions=ACTION_SETS, plan=st.none() | PLANS.filter(lambda p: len(p) < 200))
def test_every_prefix_of_a_valid_answer_is_a_valid_prefix(data, actions, plan):
    text = format_output(data.draw(st.sampled_from(actions)), plan)
    assert all(is_valid_prefix(text[:i], actions) for i in range(len(text) + 1))


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(["<plan>", "</plan>", "\n", " ", "Move", " West", "Do", "1", "7", "go", "<", "plan>"]), max_size=8),
    actions=ACTION_SETS,
)
def test_an_answer_that_starts_with_an_invalid_prefix_is_invalid(pieces, actions):
    text = "".join(pieces)
    if any(not is_valid_prefix(text[:i], actions) for i in range(len(text) + 1)):
        assert not parse_output(text, actions).valid


@pytest.mark.parametrize(
    "text", [" Do", "do", "Don", "Move north", "Do\n", "7", "<plan>\n</plan>\nDo", "<plan>a</plan>Do", "<plan>a<plan>", "<pla n>"]
)
def test_texts_no_valid_answer_starts_with(text):
    assert not is_valid_prefix(text, CRAFTER_ACTIONS)


@pytest.mark.parametrize("text", ["", "D", "Move", "Move We", "<", "<pl", "<plan>\nI will", "<plan>\nx\n</pl", "<plan>x\n</plan>\nMake Wo"])
def test_texts_a_valid_answer_starts_with(text):
    assert is_valid_prefix(text, CRAFTER_ACTIONS)


@pytest.mark.parametrize("value", [None, 7, b"Noop", ["Noop"]])
def test_non_text_input_is_invalid_without_raising(value):
    assert parse_output(value, CRAFTER_ACTIONS) == ParsedOutput(None, None, False)


def test_exact_action_is_valid_without_plan():
    assert parse_output("Move West", CRAFTER_ACTIONS) == ParsedOutput(None, "Move West", True)


def test_plan_then_action_is_valid_with_the_plan():
    text = "<plan>\nGet wood, then a table.\n</plan>\nDo"
    assert parse_output(text, CRAFTER_ACTIONS) == ParsedOutput("Get wood, then a table.", "Do", True)


def test_garbage_is_invalid_with_no_action():
    assert parse_output("I think I should look around first", CRAFTER_ACTIONS) == ParsedOutput(None, None, False)


def test_empty_text_is_invalid_with_no_action():
    assert parse_output("", CRAFTER_ACTIONS) == ParsedOutput(None, None, False)
    assert parse_output("  \n ", POGS_ACTIONS) == ParsedOutput(None, None, False)


def test_unclosed_plan_tag_is_invalid_and_falls_back_to_noop():
    parsed = parse_output("<plan>\nGet wood\nMove West", CRAFTER_ACTIONS)
    assert parsed == ParsedOutput(None, None, False)  # the caller plays the env's default action


def test_two_plans_are_invalid_with_nothing_trusted():
    text = "<plan>a</plan>\n<plan>b</plan>\nDo"
    assert parse_output(text, CRAFTER_ACTIONS) == ParsedOutput(None, None, False)


def test_plan_not_at_the_start_is_invalid():
    assert parse_output("Do\n<plan>x</plan>", CRAFTER_ACTIONS) == ParsedOutput(None, None, False)


def test_action_with_trailing_words_is_recovered_but_invalid():
    assert parse_output("Move West to the tree", CRAFTER_ACTIONS) == ParsedOutput(None, "Move West", False)
    assert parse_output("7 because it leads on", POGS_ACTIONS) == ParsedOutput(None, "7", False)
    # The longest name wins: "Make Wood Pickaxe now" is not "Make Wood ...", and "17" is not "1".
    assert parse_output("Make Wood Pickaxe now", CRAFTER_ACTIONS).action == "Make Wood Pickaxe"
    assert parse_output("17 next", POGS_ACTIONS).action == "17"


def test_action_glued_to_more_letters_is_not_recovered():
    assert parse_output("Doing things", CRAFTER_ACTIONS).action is None
    assert parse_output("7a", POGS_ACTIONS).action is None


def test_wrong_case_and_decoration_are_forgiven_but_invalid():
    assert parse_output("move west", CRAFTER_ACTIONS) == ParsedOutput(None, "Move West", False)
    assert parse_output("**Do**.", CRAFTER_ACTIONS) == ParsedOutput(None, "Do", False)
    assert parse_output("`Noop`", CRAFTER_ACTIONS) == ParsedOutput(None, "Noop", False)


def test_surrounding_whitespace_makes_a_correct_answer_invalid_but_keeps_it():
    assert parse_output("\nDo\n", CRAFTER_ACTIONS) == ParsedOutput(None, "Do", False)
    # A lone trailing newline too (a regex `$` alone would accept it).
    assert parse_output("Do\n", CRAFTER_ACTIONS) == ParsedOutput(None, "Do", False)
    assert parse_output("<plan>\nx\n</plan>\nDo\n", CRAFTER_ACTIONS) == ParsedOutput("x", "Do", False)


def test_plan_without_newline_before_action_keeps_plan_and_action_but_is_invalid():
    text = "<plan>go north</plan> Move North"
    assert parse_output(text, CRAFTER_ACTIONS) == ParsedOutput("go north", "Move North", False)


def test_plan_only_answer_keeps_the_plan_but_has_no_action():
    assert parse_output("<plan>\nexplore\n</plan>", CRAFTER_ACTIONS) == ParsedOutput("explore", None, False)


def test_empty_plan_block_is_no_plan_and_invalid():
    assert parse_output("<plan>\n</plan>\nNoop", CRAFTER_ACTIONS) == ParsedOutput(None, "Noop", False)


def test_overlong_plan_is_kept_but_invalid():
    plan = "x" * (MAX_PLAN_CHARS + 1)
    assert parse_output(format_output("Do", plan), CRAFTER_ACTIONS) == ParsedOutput(plan, "Do", False)


@pytest.mark.parametrize("plan", ["", "   ", "use <b>bold</b>"])
def test_format_refuses_empty_plans_and_angle_brackets(plan):
    with pytest.raises(ValueError):
        format_output("Do", plan)


def test_pogs_actions_are_matched_whole():
    assert parse_output("1", POGS_ACTIONS) == ParsedOutput(None, "1", True)
    assert parse_output("19", POGS_ACTIONS) == ParsedOutput(None, "19", True)
    assert parse_output("20", POGS_ACTIONS).action is None
