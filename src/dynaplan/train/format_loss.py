"""The SFT format loss after the first answer token (sft.format_loss_scope: outside_plan, plan_breaks).

The first-token loss (`sft.valid_start_nll`) scores only where an answer starts. The student's
other format failures come after that token and outside the plan's text: a `<pre>` where
`<plan>` goes, a newline or a second `</plan>` where the action after the plan goes, `Move
south` for `Move South`, words after the action. At each such position of a teacher answer,
under teacher forcing, this scores -log P(a token that keeps the answer a valid prefix of the
strict protocol: `dynaplan.agent.protocol.is_valid_prefix`, the end-of-turn only once the answer
is complete). It pushes down only the mass that would make a sampled answer invalid there, not
the choice between valid tokens.

The plan's text is left out: there every token but a stray `<` or an end-of-turn is valid, and
scoring all of it (measured: commit 01a46cb) taught the student not to end a plan rather than to
close it. With `plan_breaks` only its break points are scored (right after a newline or a full
stop), where sampled answers were measured to end the turn with the plan still open.

A prefix's valid tokens depend on it only through its protocol state, so sets are cached by a
canonical prefix, a plan's text standing in as `_PLAN_STAND_IN` (`_canonical`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynaplan.agent.protocol import MAX_PLAN_CHARS, PLAN_OPEN, is_valid_prefix, parse_output

_PLAN_STAND_IN = "\nx"  # any non-empty plan text: what `_canonical` puts for a plan's text


def _canonical(prefix: str) -> str:
    """A prefix with the same valid continuations as `prefix`: a plan's text (when non-empty and
    far from the length cap) replaced by a stand-in, so prefixes in the same protocol state share
    one cached set."""
    if not prefix.startswith(PLAN_OPEN):
        return prefix
    rest = prefix[len(PLAN_OPEN):]
    plan, tail = (rest, "") if "<" not in rest else (rest[: rest.index("<")], rest[rest.index("<"):])
    if not plan.strip() or len(plan) > MAX_PLAN_CHARS // 2:
        return prefix
    return PLAN_OPEN + _PLAN_STAND_IN + tail


def _plan_break(prefix: str) -> bool:
    """The plan's text so far ends at a break point (a newline or a full stop): where a sampled
    answer was measured to end the turn with the plan still open (sft.format_loss_scope: plan_breaks)."""
    return prefix.rstrip(" ").endswith((".", "\n"))


def _in_plan_text(prefix: str) -> bool:
    """The answer so far ends inside the plan's text: `<plan>` written, no `<` after it yet."""
    return prefix.startswith(PLAN_OPEN) and "<" not in prefix[len(PLAN_OPEN):]


class ValidContinuations:
    """The valid next tokens at the scored positions of an env's answers (token ids of one
    tokenizer, logits of `vocab_size` columns). `actions` maps a row's prompt key to its env's
    action names."""

    def __init__(self, tokenizer, actions: dict[tuple[int, ...], tuple[str, ...]], vocab_size: int, plan_breaks: bool = False):
        from dynaplan.models.hf import _token_texts

        self.tokenizer = tokenizer
        self.actions = actions
        self.vocab_size = vocab_size
        self.plan_breaks = plan_breaks
        self.end_ids = {tokenizer.eos_token_id} | (
            {tokenizer.convert_tokens_to_ids("<|im_end|>")} if "<|im_end|>" in tokenizer.get_vocab() else set()
        )
        self._by_first_char: dict[str, list[tuple[int, str]]] = {}
        for i, text in _token_texts(tokenizer):
            if text and i < vocab_size:
                self._by_first_char.setdefault(text[0], []).append((i, text))
        self._set_index: dict[tuple[tuple[str, ...], str], int] = {}
        self.sets: list[torch.Tensor] = []  # valid token ids of each canonical prefix
        self._answers: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[int, int]]] = {}

    def _valid_ids(self, actions: tuple[str, ...], prefix: str) -> list[int]:
        chars = [c for c in self._by_first_char if is_valid_prefix(prefix + c, actions)]  # valid prefixes are prefix-closed
        valid = [i for c in chars for i, text in self._by_first_char[c] if is_valid_prefix(prefix + text, actions)]
        if prefix and parse_output(prefix, actions).valid:
            valid += sorted(self.end_ids)
        return valid

    def _set_for(self, actions: tuple[str, ...], prefix: str) -> int:
        key = (actions, _canonical(prefix))
        if key not in self._set_index:
            self.sets.append(torch.tensor(self._valid_ids(actions, key[1]), dtype=torch.long))
            self._set_index[key] = len(self.sets) - 1
        return self._set_index[key]

    def positions(self, prompt_key: tuple[int, ...], answer: Sequence[int]) -> list[tuple[int, int]]:
        """(position, set index) of each scored token of an answer: after the first token (the
        first-token loss scores that one), up to and including the first end-of-turn (the chat
        template's newline after it is not the model's choice), leaving out the plan's text (but
        for its break points when `plan_breaks`)."""
        cache_key = (prompt_key, tuple(answer))
        if cache_key not in self._answers:
            if prompt_key not in self.actions:
                raise RuntimeError(f"sft.format_loss_scope: a training row starts with a prompt of no known env ({len(prompt_key)} tokens)")
            actions = self.actions[prompt_key]
            ends = [k for k, t in enumerate(answer) if t in self.end_ids]
            scored = list(answer[: ends[0] + 1]) if ends else list(answer)
            positions = []
            for k in range(1, len(scored)):
                prefix = self.tokenizer.decode(scored[:k], skip_special_tokens=False)
                if _in_plan_text(prefix) and not (self.plan_breaks and _plan_break(prefix)):
                    continue
                index = self._set_for(actions, prefix)
                if scored[k] not in self.sets[index].tolist():
                    raise RuntimeError(
                        f"sft.format_loss_scope: the training answer {self.tokenizer.decode(scored)!r} is not a valid "
                        f"answer token by token (token {k}, {self.tokenizer.decode([scored[k]])!r} after {prefix!r})"
                    )
                positions.append((k, index))
            self._answers[cache_key] = positions
        return self._answers[cache_key]

    def nll(self, logp: torch.Tensor, mask: torch.Tensor, prompt_key: tuple[int, ...], answers: Sequence[Sequence[int]]) -> torch.Tensor:
        """[B]: each row's summed -log P(the next token keeps the answer valid) over its scored
        positions (`logp` [B, G, V] log-probs of right-aligned answers, `mask` [B, G]; one
        shared-prefix group, so one env); 0 for a row with none."""
        width = mask.shape[1]
        rows, cols, set_ids = [], [], []
        for b, answer in enumerate(answers):
            for k, index in self.positions(prompt_key, answer):
                rows.append(b)
                cols.append(width - len(answer) + k)
                set_ids.append(index)
        device = logp.device
        out = torch.zeros(len(answers), dtype=logp.dtype, device=device)
        if not rows:
            return out
        longest = max(len(self.sets[i]) for i in set_ids)
        gather = torch.zeros((len(set_ids), longest), dtype=torch.long)
        padded = torch.ones((len(set_ids), longest), dtype=torch.bool)
        for n, index in enumerate(set_ids):
            ids = self.sets[index]
            gather[n, : len(ids)] = ids
            padded[n, : len(ids)] = False
        picked = logp[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        nll = -torch.logsumexp(picked.gather(1, gather.to(device)).masked_fill(padded.to(device), float("-inf")), dim=-1)
        return out.index_add(0, torch.tensor(rows, device=device), nll)
