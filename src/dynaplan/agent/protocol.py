"""The agent's output protocol: an optional `<plan>...</plan>` block, then exactly one action.

Validation is strict (`valid`), parsing is lenient (`action` may still be recovered from a
sloppy answer). Nothing here raises on model output; it must not know about any env beyond the
list of action names it is given.

Target (DESIGN.md section 4)::

    ^(<plan>\\n?PLAN\\n?</plan>\\n)?ACTION$      PLAN: 1..2000 chars, no '<'

`parse_output(text, actions)` returns a `ParsedOutput(plan, action, valid)`:

* ``valid`` is True only when the whole text matches the target exactly (no surrounding
  whitespace, the action spelled exactly as in ``actions``).
* ``action`` is the action the answer names, recovered leniently:
  - surrounding whitespace is ignored;
  - wrong case, surrounding quotes/backticks/asterisks and a trailing ``.``/``!`` are forgiven;
  - an action followed by more words on the same line ("Move West to the tree") gives that
    action (the longest action name that ends at a word boundary);
  - anything else (empty text, garbage, only a plan, an unclosed ``<plan>``, two plan blocks,
    a ``<plan>`` that does not start the answer) gives ``None``: the caller plays the env's
    default action and counts the step as invalid.
* ``plan`` is the stripped text of the one well-formed plan block, or ``None`` when there is
  none, when it is empty, when it is unclosed, or when there are two blocks. A plan longer
  than 2000 characters is kept (the agent did write it) but the answer is not ``valid``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PLAN_OPEN = "<plan>"
PLAN_CLOSE = "</plan>"
MAX_PLAN_CHARS = 2000

_PLAN_BLOCK = re.compile(r"<plan>(.*?)</plan>", re.DOTALL)
_STRIP_CHARS = " \t\r\n\"'`*"


@dataclass(frozen=True)
class ParsedOutput:
    plan: str | None
    action: str | None
    valid: bool


def target_regex(actions: Sequence[str]) -> re.Pattern[str]:
    """The strict target regex for an action set (longest names first, so prefixes lose)."""
    names = sorted(actions, key=len, reverse=True)
    alternatives = "|".join(re.escape(a) for a in names)
    return re.compile(
        r"^(<plan>\n?(?P<plan>[^<]{1,%d}?)\n?</plan>\n)?(?P<action>%s)$" % (MAX_PLAN_CHARS, alternatives)
    )


def format_output(action: str, plan: str | None = None) -> str:
    """The canonical answer: ``<plan>\\nPLAN\\n</plan>\\nACTION`` or just ``ACTION``."""
    if plan is None:
        return action
    plan = plan.strip()
    if not plan or "<" in plan:
        raise ValueError(f"plan must be non-empty text without '<', got {plan!r}")
    return f"{PLAN_OPEN}\n{plan}\n{PLAN_CLOSE}\n{action}"


def _recover_action(text: str, actions: Sequence[str]) -> str | None:
    first_line = text.strip().split("\n", 1)[0].strip(_STRIP_CHARS).rstrip(".!").strip(_STRIP_CHARS)
    if not first_line:
        return None
    folded = first_line.casefold()
    by_fold = {a.casefold(): a for a in actions}
    if folded in by_fold:
        return by_fold[folded]
    for name in sorted(actions, key=len, reverse=True):
        key = name.casefold()
        if folded.startswith(key) and not folded[len(key)].isalnum():
            return name
    return None


def is_valid_prefix(text: str, actions: Sequence[str]) -> bool:
    """True when some answer that `parse_output` calls valid starts with `text` (the empty text
    included): an answer that begins this way can still end valid, any other cannot."""
    if any(a.startswith(text) for a in actions) or PLAN_OPEN.startswith(text):
        return True
    if not text.startswith(PLAN_OPEN):
        return False
    rest = text[len(PLAN_OPEN):]
    if "<" not in rest:  # still inside the plan
        return len(rest) <= MAX_PLAN_CHARS + 2
    plan, tail = rest[: rest.index("<")], rest[rest.index("<"):]
    closing = f"{PLAN_CLOSE}\n"
    if not plan.strip() or len(plan.removeprefix("\n").removesuffix("\n")) > MAX_PLAN_CHARS:
        return False
    if closing.startswith(tail):
        return True
    return tail.startswith(closing) and any(a.startswith(tail[len(closing):]) for a in actions)


def parse_output(text: str, actions: Sequence[str]) -> ParsedOutput:
    """Parse a model answer; never raises (see the module docstring for every case)."""
    if not isinstance(text, str):
        return ParsedOutput(None, None, False)
    # fullmatch, not match: the pattern's `$` also matches before a trailing newline, which
    # would make "Do\n" valid although the docstring (and SFT targets) say it is not.
    match = target_regex(actions).fullmatch(text)
    if match:
        plan = match.group("plan")
        if plan is None:
            return ParsedOutput(None, match.group("action"), True)
        plan = plan.strip()
        return ParsedOutput(plan or None, match.group("action"), bool(plan))

    stripped = text.strip()
    opens = stripped.count(PLAN_OPEN)
    closes = stripped.count(PLAN_CLOSE)
    if opens == 0 and closes == 0:
        return ParsedOutput(None, _recover_action(stripped, actions), False)
    if opens != 1 or closes != 1 or not stripped.startswith(PLAN_OPEN):
        # Unclosed, doubled or misplaced plan tags: nothing in the answer can be trusted.
        return ParsedOutput(None, None, False)
    block = _PLAN_BLOCK.match(stripped)
    if block is None:  # a closing tag before the opening one
        return ParsedOutput(None, None, False)
    plan = block.group(1).strip() or None
    rest = stripped[block.end():]
    return ParsedOutput(plan, _recover_action(rest, actions), False)
