"""Forward passes that pay for a shared prompt prefix once (used by SFT and PPO training).

Every prompt of one env starts with the same system message (the game's rules and the planning
instruction: 524 of ~750 tokens in Crafter), and training batches are many such prompts, each
followed by a short answer. `shared_prefix_forward` runs the batch's longest common token prefix
once at batch size 1, repeats its keys and values for every row
(`DynamicCache.batch_repeat_interleave`) and runs each row's rest, right-padded, on top. This is
the same computation as one full forward per row: gradients flow through the prefix once,
summed over the rows, exactly as they would through B copies of it (tests compare both).
Only the positions that predict answer tokens go through the LM head (the vocabulary is 49k).

It needs the model's own forward (a cache, position ids), so it is used where the caller owns
the model: one process, no gradient checkpointing (which turns the cache off). Multi-GPU SFT
takes TRL's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# A shared prefix shorter than this is not worth a separate forward pass.
MIN_SHARED_PREFIX = 16


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix of `prompts`, kept one token short of the
    shortest prompt (the last prompt token must be in the suffix: its hidden state feeds the
    value head and its logit predicts the first answer token)."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts[1:]):
        n += 1
    return n


def shared_prefix_run_once(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens `shared_prefix_forward` runs once for these prompts: their common
    prefix when there are 2+ rows and it is at least MIN_SHARED_PREFIX (read at call time), else 0."""
    prefix = shared_prefix_len(prompts) if len(prompts) > 1 else 0
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


@dataclass
class PrefixForward:
    """What `shared_prefix_forward` computed, every tensor on the model's device.

    `hidden` is [B, S, H] (each row's suffix). Answer tokens are right-aligned in [B, G]:
    `targets` holds them, `mask` marks them, `gather` names the suffix position whose hidden
    state predicts each one (the token before it). `last_prompt` is each row's last prompt
    position in the suffix."""

    hidden: torch.Tensor
    gather: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    last_prompt: torch.Tensor

    def answer_hidden(self) -> torch.Tensor:
        """[B, G, H]: the hidden states that predict the answer tokens."""
        rows = torch.arange(self.hidden.shape[0], device=self.hidden.device).unsqueeze(-1)
        return self.hidden[rows, self.gather]

    def answer_logits(self, model) -> torch.Tensor:
        """[B, G, V] float32 logits of the answer positions only."""
        return _causal_lm(model).get_output_embeddings()(self.answer_hidden()).float()

    def prompt_hidden(self) -> torch.Tensor:
        """[B, H]: the hidden state at each row's last prompt token."""
        rows = torch.arange(self.hidden.shape[0], device=self.hidden.device)
        return self.hidden[rows, self.last_prompt]


def first_answer_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B]: the column of each row's first answer token in a [B, G] mask of right-aligned answers
    (`PrefixForward.mask`)."""
    return mask.shape[1] - mask.sum(-1).long()


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shared_prefix_forward(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
) -> PrefixForward:
    """One forward over prompt + answer tokens of a batch, the common prefix computed once
    (when it is at least MIN_SHARED_PREFIX tokens, read at call time, and the batch has 2+
    rows). `model` is a causal LM, a PEFT model around one included (adapters stay active)."""
    from dynaplan.models.hf import CACHE_KW, output_cache

    batch = len(prompts)
    prefix = shared_prefix_run_once(prompts)
    rests = [list(p[prefix:]) + list(c) for p, c in zip(prompts, completions)]
    seq_len, gen_len = max(len(r) for r in rests), max(1, max(len(c) for c in completions))
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, prefix + seq_len), dtype=torch.long)
    attention_mask[:, :prefix] = 1
    targets = torch.full((batch, gen_len), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, gen_len))
    gather = torch.zeros((batch, gen_len), dtype=torch.long)
    last_prompt = torch.zeros(batch, dtype=torch.long)
    for b, (rest, c) in enumerate(zip(rests, completions)):
        input_ids[b, : len(rest)] = torch.tensor(rest)
        attention_mask[b, prefix : prefix + len(rest)] = 1
        start = len(rest) - len(c)  # first answer token's position in the suffix
        last_prompt[b] = start - 1
        if c:
            targets[b, gen_len - len(c):] = torch.tensor(list(c))
            mask[b, gen_len - len(c):] = 1
            gather[b, gen_len - len(c):] = torch.arange(start - 1, len(rest) - 1)
    position_ids = (prefix + torch.arange(seq_len)).unsqueeze(0).expand(batch, -1)
    causal_lm = _causal_lm(model)
    device = next(causal_lm.parameters()).device
    decoder = causal_lm.get_decoder()
    cache = None
    if prefix:
        out = decoder(input_ids=torch.tensor([list(prompts[0][:prefix])], device=device), use_cache=True)
        cache = output_cache(out)
        cache.batch_repeat_interleave(batch)
    hidden = decoder(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device), use_cache=prefix > 0, **{CACHE_KW: cache},
    ).last_hidden_state
    return PrefixForward(
        hidden=hidden,
        gather=gather.to(device),
        targets=targets.to(device),
        mask=mask.to(device),
        last_prompt=last_prompt.to(device),
    )
