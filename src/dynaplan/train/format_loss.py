"""The SFT format loss: -log P(the next token keeps the answer valid), at every answer position.

Cross-entropy on the teacher's answers teaches the format only as well as it teaches the
teacher's words: at temperature 1 the student keeps a few percent of its mass on tokens that
make the answer invalid, and over a 30-token plan those add up (the `evaluate_sft` failures: plans
that end without `</plan>`, '<plan>\\nPlan: Do<|im_end|>'; actions with trailing words). This
term, weighed by `sft.format_loss_weight`, adds per scored position

    -log sum_{v valid} P(v | prompt, answer so far)

where v is valid when the answer so far + v is still the beginning of an answer
`protocol.parse_output` calls valid (`protocol.is_valid_prefix`), and the end of turn is valid only
where the answer so far is already complete. It pushes down only the invalid mass, never the
choice between valid tokens (which action, whether to plan, which plan words).

Two kinds of positions are scored:

- **every position of the teacher's answer** (teacher forcing), up to and including its end of
  turn;
- **the unclosed plan**: for an answer with a plan, the same answer with `</plan>\\n` left out
  (`<plan>\\nPLAN\\n` ACTION), whose end of turn is invalid. The student's commonest failure is
  exactly this state, which the teacher's answers never show. It runs on the cached keys and
  values of the teacher's row (`continue_rows`): a few tokens per plan answer, not a second
  forward over the prompt.

The valid tokens depend on the answer so far only through a small state (`answer_state`): the
text itself before the plan, whether the plan text so far is blank, and the text after its first
'<'. Each state's vocabulary mask is built once (~0.1 s) and cached; an env's actions key them.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch

from dynaplan.agent.protocol import MAX_PLAN_CHARS, PLAN_CLOSE, PLAN_OPEN, is_valid_prefix, parse_output

# A plan text this much shorter than MAX_PLAN_CHARS cannot reach it with one more token (the
# longest vocabulary token is far shorter); a longer one is keyed by its own text.
_LENGTH_MARGIN = 256


def answer_state(text: str) -> tuple[str, str]:
    """(kind, representative text) of an answer so far: two answers with the same state have the
    same valid next tokens (`is_valid_prefix(text + t)` is the same for every token text t, and
    so is whether the answer is complete). Before the plan (an action, a part of '<plan>') the
    text is its own state; inside the plan only whether its text so far is blank matters; after
    the plan's first '<', the text from there on (when the plan is not blank)."""
    if not text.startswith(PLAN_OPEN):
        return "head", text
    rest = text[len(PLAN_OPEN):]
    if len(rest) > MAX_PLAN_CHARS - _LENGTH_MARGIN:
        return "exact", text
    if "<" not in rest:
        return ("plan", text) if not rest.strip() else ("plan", PLAN_OPEN + "\nx")
    plan, tail = rest[: rest.index("<")], rest[rest.index("<"):]
    return ("tail", text) if not plan.strip() else ("tail", PLAN_OPEN + "\nx" + tail)


class FormatLoss:
    """Valid-next-token masks by (actions, answer state), and the loss terms over a shared-prefix
    forward. `actions_by_key` maps each env's `prompt_key` to its action names."""

    def __init__(self, tokenizer, weight: float, actions_by_key: dict[tuple[int, ...], tuple[str, ...]]):
        from dynaplan.models.hf import _token_texts

        self.tokenizer = tokenizer
        self.weight = float(weight)
        self.actions_by_key = dict(actions_by_key)
        self.vocab = len(tokenizer)
        # special tokens are never valid inside an answer; the rest grouped by first character
        self.by_first: dict[str, list[tuple[int, str]]] = {}
        for i, text in _token_texts(tokenizer):
            if text:
                self.by_first.setdefault(text[0], []).append((i, text))
        self.eos_id = tokenizer.eos_token_id
        self.close_ids = tokenizer.encode(f"{PLAN_CLOSE}\n", add_special_tokens=False)
        self._index: dict[tuple[tuple[str, ...], tuple[str, str]], int] = {}
        self._masks: list[torch.Tensor] = []

    def actions(self, prompt: Sequence[int]) -> tuple[str, ...]:
        from dynaplan.train.sft import prompt_key

        key = prompt_key(prompt)
        if key not in self.actions_by_key:
            raise RuntimeError(f"sft.format_loss_weight: a training row starts with a prompt of no known env ({len(prompt)} tokens)")
        return self.actions_by_key[key]

    def state_index(self, actions: tuple[str, ...], text: str) -> int:
        """Row of `masks()` for the answer so far `text` (built on first use)."""
        key = (actions, answer_state(text))
        if key not in self._index:
            rep = key[1][1]
            mask = torch.zeros(self.vocab, dtype=torch.bool)
            # what is a valid prefix stays one when cut shorter: a token whose first character
            # already fails cannot pass
            mask[[i for c, group in self.by_first.items() if is_valid_prefix(rep + c, actions)
                  for i, t in group if is_valid_prefix(rep + t, actions)]] = True
            if self.eos_id is not None:
                mask[self.eos_id] = parse_output(rep, actions).valid
            self._index[key] = len(self._masks)
            self._masks.append(mask)
        return self._index[key]

    def masks(self) -> torch.Tensor:
        return torch.stack(self._masks)

    def scored_positions(self, answer: Sequence[int]) -> int:
        """How many of an answer's tokens are scored: up to and including its first end of turn
        (what follows it is never generated)."""
        answer = list(answer)
        return answer.index(self.eos_id) + 1 if self.eos_id in answer else len(answer)

    def states(self, actions: tuple[str, ...], answer: Sequence[int], start: Sequence[int] = ()) -> list[int]:
        """State of the answer before each of `answer`'s scored tokens (after `start`, ids that
        come first: the cut teacher answer of an unclosed plan)."""
        answer, start = list(answer), list(start)
        return [
            self.state_index(actions, self.tokenizer.decode(start + answer[:t], skip_special_tokens=False))
            for t in range(self.scored_positions(answer))
        ]

    def unclosed(self, answer: Sequence[int]) -> tuple[int, list[int]] | None:
        """(cut, tokens) of the answer with its plan left open: the teacher's answer up to `cut`
        (before `</plan>\\n`), then `tokens` (its action and end of turn); None for an answer
        without a plan or whose closing tag is not the tokens of `</plan>\\n`."""
        answer, n = list(answer), len(self.close_ids)
        if not self.tokenizer.decode(answer, skip_special_tokens=False).startswith(PLAN_OPEN):
            return None
        for cut in range(len(answer) - n + 1):
            if answer[cut: cut + n] == self.close_ids:
                tail = answer[cut + n:]
                end = tail.index(self.eos_id) + 1 if self.eos_id in tail else len(tail)
                return (cut, tail[:end]) if end > 1 else None
        return None

    def group_nll(self, model, out, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], logp: torch.Tensor) -> torch.Tensor:
        """[B] summed -log P(valid next token) of each row of one shared-prefix group: its teacher
        answer's scored positions (`logp` [B, G, V], right-aligned answers), plus those of its
        unclosed plan (`out.cache` must hold the group's keys and values: `keep_cache=True`)."""
        actions = self.actions(prompts[0])
        width = logp.shape[1]
        index = torch.full(out.mask.shape, -1, dtype=torch.long)
        for b, answer in enumerate(answers):
            states = self.states(actions, answer)
            offset = width - len(answer)
            index[b, offset: offset + len(states)] = torch.tensor(states, dtype=torch.long)
        nll = _masked_nll(logp, index.to(logp.device), self)
        unclosed = [(b, cut) for b, answer in enumerate(answers) if (cut := self.unclosed(answer)) is not None]
        if unclosed:
            rows = [b for b, _ in unclosed]
            hidden = continue_rows(model, out, rows, [cut for _, (cut, _) in unclosed], [tokens[:-1] for _, (_, tokens) in unclosed])
            from dynaplan.train.prefix import _causal_lm

            cont_logp = torch.log_softmax(_causal_lm(model).get_output_embeddings()(hidden).float(), dim=-1)
            cont_index = torch.full(cont_logp.shape[:2], -1, dtype=torch.long)
            for r, (b, (cut, tokens)) in enumerate(unclosed):
                # the first action token follows the cut teacher answer: teacher forcing scored it
                states = self.states(actions, tokens, start=answers[b][:cut])[1:]
                cont_index[r, : len(states)] = torch.tensor(states, dtype=torch.long)
            nll = nll.index_add(0, torch.tensor(rows, device=nll.device), _masked_nll(cont_logp, cont_index.to(logp.device), self))
        return nll


def _masked_nll(logp: torch.Tensor, index: torch.Tensor, loss: FormatLoss) -> torch.Tensor:
    """[B]: -sum over positions with a state (`index` >= 0) of log P(a token of that state's mask)."""
    scored = index >= 0
    if not scored.any():
        return logp.new_zeros(logp.shape[0])
    masks = loss.masks().to(logp.device)
    rows, cols = scored.nonzero(as_tuple=True)
    lse = logp[rows, cols].masked_fill(~masks[index[rows, cols]], float("-inf")).logsumexp(-1)
    return logp.new_zeros(logp.shape[0]).index_add(0, rows, -lse)


def continue_rows(model, out, rows: Sequence[int], cuts: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """[R, M, H] hidden states of `tokens` appended to rows `rows` of a `shared_prefix_forward`
    cut after their answer's first `cuts` tokens, on the forward's cached keys and values: the same as a forward over prompt + answer[:cut] +
    tokens, at a few tokens' cost."""
    from dynaplan.models.hf import CACHE_KW
    from dynaplan.train.prefix import _causal_lm

    if out.cache is None:
        raise RuntimeError("continue_rows needs a shared_prefix_forward(..., keep_cache=True)")
    device = out.hidden.device
    width = max(1, max(len(t) for t in tokens))
    past = out.cache.get_seq_length()
    prefix = past - out.hidden.shape[1]
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), past + width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (b, cut, toks) in enumerate(zip(rows, cuts, tokens)):
        keep = int(out.last_prompt[b]) + 1 + cut  # suffix positions of the prompt + answer[:cut]
        ids[r, : len(toks)] = torch.tensor(list(toks), dtype=torch.long)
        attention[r, : prefix + keep] = 1
        attention[r, past: past + len(toks)] = 1
        positions[r] = prefix + keep + torch.arange(width)
    cache = out.cache
    cache.batch_select_indices(torch.tensor(list(rows), device=device))
    out.cache = None  # selected and extended in place: no longer the group's cache
    return _causal_lm(model).get_decoder()(
        input_ids=ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
        use_cache=True, **{CACHE_KW: cache},
    ).last_hidden_state
