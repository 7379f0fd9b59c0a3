"""`sft.plan_vocab_loss_weight`: keep the student's plan text in the teacher's plan language.

The scripted teachers write plans in a small language (18 Crafter styles over a few hundred
tokens: sub-goals, directions, counts, reasons). Trained on ~100 of them, the 135M student's plan
text at temperature 1 still draws a fifth of its tokens from the rest of the 49k vocabulary (the
base model's prose), and a plan that wanders there rarely ends in a closing tag. The extra term,
at every answer position inside a plan block (after `<plan>`, up to and including `</plan>`), is
-log P(next token is one of the tokens the teacher's plans use): the mass on every other token,
and nothing else; the choice between plan-language tokens is the cross-entropy's. The vocabulary
is the tokens of the training episodes' plan answers of each env (never the held-out ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dynaplan.agent.protocol import PLAN_CLOSE, PLAN_OPEN


def tag_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the opening and the closing plan tag as they appear in an answer (the opening
    tag starts the answer; the closing one follows a newline)."""
    open_ids = tokenizer(PLAN_OPEN, add_special_tokens=False)["input_ids"]
    close_ids = tokenizer("\n" + PLAN_CLOSE, add_special_tokens=False)["input_ids"][len(tokenizer("\n", add_special_tokens=False)["input_ids"]):]
    return list(open_ids), list(close_ids)


def plan_positions(answer: Sequence[int], open_ids: Sequence[int], close_ids: Sequence[int]) -> range:
    """Indices into `answer` (token ids) of the tokens inside its plan block: from the token after
    the opening tag through the last token of the first closing tag after it (to the end when it is
    never closed). Empty for an answer that does not open with the tag."""
    n_open, n_close = len(open_ids), len(close_ids)
    if list(answer[:n_open]) != list(open_ids):
        return range(0)
    for i in range(n_open, len(answer) - n_close + 1):
        if list(answer[i : i + n_close]) == list(close_ids):
            return range(n_open, i + n_close)
    return range(n_open, len(answer))


def plan_vocab_ids(
    tokenizer, answers_by_key: Mapping[tuple[int, ...], Sequence[Sequence[int]]], texts_by_key: Mapping[tuple[int, ...], Sequence[str]]
) -> dict[tuple[int, ...], torch.Tensor]:
    """Per env (keyed by its prompts' `prompt_key`): the sorted token ids of its teacher plans,
    `texts_by_key` (whole plan answers, tokenized alone) together with the plan-block tokens of
    the labelled training answers (`answers_by_key`, token ids as trained), so that every trained
    plan token is in its env's vocabulary."""
    open_ids, close_ids = tag_ids(tokenizer)
    vocab = {}
    for key in set(answers_by_key) | set(texts_by_key):
        ids: set[int] = set()
        for text in texts_by_key.get(key, ()):
            ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
        for answer in answers_by_key.get(key, ()):
            ids.update(answer[i] for i in plan_positions(answer, open_ids, close_ids))
        if ids:
            vocab[key] = torch.tensor(sorted(ids), dtype=torch.long)
    return vocab


def plan_mask(targets: torch.Tensor, mask: torch.Tensor, open_ids: Sequence[int], close_ids: Sequence[int]) -> torch.Tensor:
    """[B, G] float mask of the plan-block positions of right-aligned answers (`targets` token ids
    and `mask` as in `PrefixForward`)."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    width = mask.shape[1]
    for row, n in enumerate(mask.sum(-1).long().tolist()):
        answer = targets[row, width - n :].tolist()
        for i in plan_positions(answer, open_ids, close_ids):
            out[row, width - n + i] = 1.0
    return out


def plan_vocab_nll(logp: torch.Tensor, positions: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """[B]: each row's summed -log P(next token in `vocab`) over its plan-block `positions` ([B, G]
    mask; `logp` [B, G, V] log-probs)."""
    in_vocab = torch.logsumexp(logp[..., vocab.to(logp.device)], dim=-1)
    return -(in_vocab * positions).sum(-1)
