"""The SFT format loss outside the plan text (train/format_loss.py): at every scored answer
position the tokens that keep the answer valid, checked against the protocol over the whole
vocabulary, and the loss they give."""

from __future__ import annotations

import pytest
import torch

from dynaplan.agent.protocol import is_valid_prefix, parse_output
from dynaplan.train.format_loss import ValidContinuations

ACTIONS = ("Move East", "Move West", "Do", "Noop")
KEY = (7, 8, 9)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    """(token texts, special ids, end-of-turn id) for brute force over the vocabulary."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    return texts, set(tokenizer.all_special_ids), tokenizer.convert_tokens_to_ids("<|im_end|>")


def _answer_ids(tokenizer, text: str) -> list[int]:
    """An answer's labelled tokens as the chat template makes them: text, end-of-turn, newline."""
    return tokenizer.encode(text + "<|im_end|>\n", add_special_tokens=False)


def _brute_force_valid(vocab, prefix: str) -> set[int]:
    texts, special, end = vocab
    valid = {i for i, t in enumerate(texts) if i not in special and t and is_valid_prefix(prefix + t, ACTIONS)}
    return valid | ({end} if prefix and parse_output(prefix, ACTIONS).valid else set())


def test_scored_positions_admit_exactly_the_tokens_that_keep_the_answer_valid(tokenizer, vocab):
    """Brute force over the vocabulary: a token is in a position's set iff the prefix plus its
    text is still a valid prefix (end-of-turn iff the prefix is a whole valid answer). Scored:
    every position after the first up to the end-of-turn except inside the plan's text."""
    scorer = ValidContinuations(tokenizer, {KEY: ACTIONS}, vocab_size=len(tokenizer))
    end = vocab[2]
    for answer in ("<plan>\nGo east.\n</plan>\nMove East", "Move West", "Do"):
        ids = _answer_ids(tokenizer, answer)
        positions = scorer.positions(KEY, ids)
        prefixes = {k: tokenizer.decode(ids[:k]) for k in range(1, ids.index(end) + 1)}
        expected = [k for k, p in prefixes.items() if not (p.startswith("<plan>") and "<" not in p[len("<plan>"):])]
        assert [k for k, _ in positions] == expected
        assert positions[-1][0] == ids.index(end)  # the end-of-turn is scored
        for k, index in positions:
            assert set(scorer.sets[index].tolist()) == _brute_force_valid(vocab, prefixes[k]), (answer, prefixes[k])
    plan = _answer_ids(tokenizer, "<plan>\nGo east.\n</plan>\nMove East")
    assert {"<", "<plan>\nGo east.\n</plan>\n"} <= {tokenizer.decode(plan[:k]) for k, _ in scorer.positions(KEY, plan)}


def test_loss_is_the_summed_nll_of_a_valid_next_token_per_answer(tokenizer, vocab):
    """Right-aligned answers in one group: each row's loss is the sum over its scored positions
    of -log P(valid next token), computed here from the protocol directly."""
    torch.manual_seed(0)
    scorer = ValidContinuations(tokenizer, {KEY: ACTIONS}, vocab_size=len(tokenizer))
    answers = [_answer_ids(tokenizer, "<plan>\nGo west.\n</plan>\nMove West"), _answer_ids(tokenizer, "Noop")]
    width = max(len(a) for a in answers) + 2
    logp = torch.randn(2, width, len(tokenizer)).mul(3).log_softmax(-1).requires_grad_()
    mask = torch.zeros(2, width)
    for b, a in enumerate(answers):
        mask[b, width - len(a):] = 1
    got = scorer.nll(logp, mask, KEY, answers)
    for b, a in enumerate(answers):
        expected = 0.0
        for k in range(1, a.index(vocab[2]) + 1):
            prefix = tokenizer.decode(a[:k])
            if prefix.startswith("<plan>") and "<" not in prefix[len("<plan>"):]:
                continue
            valid = sorted(_brute_force_valid(vocab, prefix))
            expected -= float(torch.logsumexp(logp.detach()[b, width - len(a) + k, valid], -1))
        assert float(got[b].detach()) == pytest.approx(expected, rel=1e-4)
    got.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert scorer.nll(logp, mask, KEY, [_answer_ids(tokenizer, "Do")[:1]] * 2).abs().sum() == 0  # nothing scored


def test_an_answer_that_is_not_valid_token_by_token_is_an_error(tokenizer):
    scorer = ValidContinuations(tokenizer, {KEY: ACTIONS}, vocab_size=len(tokenizer))
    with pytest.raises(RuntimeError, match="not a valid answer token by token .* after 'Move'"):
        scorer.positions(KEY, _answer_ids(tokenizer, "Move east"))
    with pytest.raises(RuntimeError, match="prompt of no known env"):
        scorer.positions((1, 2), _answer_ids(tokenizer, "Do"))


def test_plan_breaks_also_score_the_plan_texts_break_points(tokenizer, vocab):
    """sft.format_loss_scope: plan_breaks: the outside_plan positions plus, inside the plan's text,
    exactly the positions right after a newline or a full stop, where the protocol's valid tokens
    (brute force) are every text token but the end-of-turn and a stray tag."""
    outside = ValidContinuations(tokenizer, {KEY: ACTIONS}, vocab_size=len(tokenizer))
    scorer = ValidContinuations(tokenizer, {KEY: ACTIONS}, vocab_size=len(tokenizer), plan_breaks=True)
    end = vocab[2]
    ids = _answer_ids(tokenizer, "<plan>\nShort term: get wood. Longer term: a table.\n</plan>\nMove East")
    added = sorted({k for k, _ in scorer.positions(KEY, ids)} - {k for k, _ in outside.positions(KEY, ids)})
    assert {k for k, _ in outside.positions(KEY, ids)} <= {k for k, _ in scorer.positions(KEY, ids)}
    assert [tokenizer.decode(ids[:k])[-7:] for k in added] == ["<plan>\n", "t wood.", " table.", "table.\n"]
    for k, index in scorer.positions(KEY, ids):
        valid = set(scorer.sets[index].tolist())
        assert valid == _brute_force_valid(vocab, tokenizer.decode(ids[:k]))
        if k in added:
            assert end not in valid and ids[k] in valid and len(valid) > len(tokenizer) - 100
    assert [k for k, _ in scorer.positions(KEY, _answer_ids(tokenizer, "Move West"))] == [
        k for k, _ in outside.positions(KEY, _answer_ids(tokenizer, "Move West"))
    ]
