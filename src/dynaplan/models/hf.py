"""The `hf` backend: batched generation with transformers on CPU or GPU, base model plus an optional
PEFT LoRA adapter, with a reused KV cache for the shared system prompt and exact token log-probs.

A hand-written decode loop (left padding, KV cache, per-answer seeded sampling) so that the
log-probs we return are the ones PPO recomputes with `score`. No env or planning logic here.

Log-probs are log_softmax(logits / T) over the whole vocabulary (T = temperature, 1 when greedy):
the policy's distribution at that temperature, before top-p truncation and before the
`forbid_plan` ban, so `score()` on the same tokens reproduces them without knowing those settings.
A stop token (EOS / <|im_end|>) that ends an answer is the last of `token_ids` (with its log-prob;
the policy must learn to stop) and is not part of `text`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dynaplan.models.base import Generation, GenerationRequest, SamplingParams

PLAN_OPENING = "<plan>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def _cache_keyword() -> str:
    """transformers >= 5.2x renamed the forward's `past_key_values` to `cache` (the old name
    warns); GPU images may carry an older 5.x, so use whichever this install has."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


CACHE_KW = _cache_keyword()


def output_cache(out):
    """The cache a forward returned, under whichever name this transformers uses."""
    return getattr(out, CACHE_KW)


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off while we sample or score (a live PPO model may be in train mode), then back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class AdapterMismatchError(ValueError):
    """A LoRA adapter that was not trained on this base model (name or shapes differ)."""


def row_seed(seed: int, index: int) -> int:
    """The seed of answer `index` of a batch generated with `seed`: every answer has its own
    random stream, so the OpenAI backend (one request per answer) samples like the hf backend."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _check_adapter_base(model_dir: Path, adapter_dir: Path, adapter_cfg: dict) -> None:
    """Raise AdapterMismatchError unless the adapter's recorded base is this model dir, or a dir
    with the same source (manifest sha256) or, lacking manifests, the same architecture."""
    recorded = adapter_cfg.get("base_model_name_or_path")
    if not recorded:
        return
    ours = model_dir.resolve()
    theirs = Path(recorded)
    if not theirs.is_absolute():
        theirs = Path.cwd() / theirs
    if theirs.resolve() == ours:
        return
    if (theirs / "config.json").is_file():
        mine_m, their_m = ours / "manifest.json", theirs / "manifest.json"
        if mine_m.is_file() and their_m.is_file():
            if _read_json(mine_m).get("sha256") == _read_json(their_m).get("sha256"):
                return
        else:
            a, b = _read_json(ours / "config.json"), _read_json(theirs / "config.json")
            if all(a.get(k) == b.get(k) for k in _ARCH_KEYS):
                return
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on base {recorded!r}, which differs from {model_dir} "
            "(different source or architecture); pass the matching --model, or check_adapter_base=False"
        )
    raise AdapterMismatchError(
        f"adapter {adapter_dir} was trained on base {recorded!r}, not on {model_dir}, and that base is "
        "not a local directory to compare with; pass the matching --model, or check_adapter_base=False"
    )


def _check_adapter_shapes(model, adapter_dir: Path) -> None:
    """Every LoRA matrix must fit the module it adapts (PEFT's own error is a wall of text)."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterMismatchError(f"adapter {adapter_dir}: adapter_model.safetensors not found")
    from safetensors import safe_open

    modules = dict(model.named_modules())
    problems: list[str] = []
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            path = key.split(".lora_")[0]
            path = path.removeprefix("base_model.model.")
            module = modules.get(path)
            shape = tuple(fh.get_slice(key).get_shape())
            if module is None or not hasattr(module, "weight"):
                problems.append(f"{key}: the base model has no module {path!r}")
                continue
            out_f, in_f = module.weight.shape[0], module.weight.shape[-1]
            if ".lora_A." in key and shape[-1] != in_f:
                problems.append(f"{key}: shape {shape} does not fit in_features={in_f}")
            if ".lora_B." in key and shape[0] != out_f:
                problems.append(f"{key}: shape {shape} does not fit out_features={out_f}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} problems)" if len(problems) > 3 else "")
        raise AdapterMismatchError(f"adapter {adapter_dir} does not fit this base model: {shown}")


def load_model(
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    check_adapter_base: bool = True,
    merge_adapter: bool = False,
):
    """(model, tokenizer): a safetensors HF dir (e.g. models/base) plus an optional LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"model dir {model_dir} has no config.json (run `dvc repro base_model` to create models/base)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_resolve_dtype(dtype))
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        cfg_path = adapter_dir / "adapter_config.json"
        if not cfg_path.is_file():
            raise AdapterMismatchError(f"adapter dir {adapter_dir} has no adapter_config.json (not a PEFT adapter)")
        if check_adapter_base:
            _check_adapter_base(model_dir, adapter_dir, _read_json(cfg_path))
        _check_adapter_shapes(model, adapter_dir)
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except RuntimeError as err:  # size mismatches we did not foresee
            raise AdapterMismatchError(f"adapter {adapter_dir} does not fit base {model_dir}: {err}") from None
        if merge_adapter:
            model = model.merge_and_unload()
    model.to(device).eval()
    return model, tokenizer


def stop_token_ids(tokenizer, model=None) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(int(i) for i in gen_eos)
    return ids


def plan_opening_token_ids(tokenizer, opening: str = PLAN_OPENING) -> list[int]:
    """Tokens that could begin an answer with `opening`: after stripping leading whitespace their
    text is a non-empty prefix of it ('<', ' <', '<pl'...) or starts with it. With SmolLM2,
    '<plan>' is '<' 'plan' '>', so banning these at the first non-blank position is exact."""
    banned = []
    for i, text in _token_texts(tokenizer):
        t = text.lstrip()
        if t and (opening.startswith(t) or t.startswith(opening)):
            banned.append(i)
    return banned


def valid_prefix_token_ids(tokenizer, actions: Sequence[str]) -> list[int]:
    """Tokens an answer valid under the strict protocol can begin with (an action's first
    piece, '<' of '<plan>', ...): the probability of the rest is the probability that the first
    sampled token already makes the answer invalid."""
    from dynaplan.agent.protocol import is_valid_prefix

    return [i for i, text in _token_texts(tokenizer) if text and is_valid_prefix(text, actions)]


def _token_texts(tokenizer) -> list[tuple[int, str]]:
    """(id, text) of every vocabulary token that is not a special token."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    return [(i, text) for i, text in enumerate(texts) if i not in special]


def sequence_logprobs(
    model,
    prompt_token_ids: Sequence[Sequence[int]],
    answer_token_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Log-probs of each answer token given its prompt: one 1-D tensor per pair, in graph (call
    under torch.no_grad() for inference). Left-padded batch, positions from the attention mask,
    logits only for the answer positions. PPO's and SFT-KL's recomputation uses exactly this."""
    if len(prompt_token_ids) != len(answer_token_ids):
        raise ValueError("prompt_token_ids and answer_token_ids must have the same length")
    device = next(model.parameters()).device
    seqs = [list(p) + list(a) for p, a in zip(prompt_token_ids, answer_token_ids)]
    if any(len(p) == 0 for p in prompt_token_ids):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in seqs)
    max_answer = max((len(a) for a in answer_token_ids), default=0)
    if max_answer == 0:
        return [torch.zeros(0, device=device) for _ in seqs]
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=max_answer + 1)
    # logits[:, j] predicts token at absolute position width - (max_answer + 1) + j + 1
    logits = out.logits[:, :-1, :].float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    result = []
    for row, answer in enumerate(answer_token_ids):
        n = len(answer)
        if n == 0:
            result.append(logp.new_zeros(0))
            continue
        target = torch.tensor(list(answer), dtype=torch.long, device=device)
        result.append(logp[row, max_answer - n :, :].gather(-1, target[:, None]).squeeze(-1))
    return result


@dataclass
class _Prompt:
    ids: list[int]
    cache_key: tuple[int, ...] | None  # token ids of the system turn, when it is a prefix of ids


class HFBackend:
    """Batched local generation. `generate` follows the Backend protocol; `score` recomputes
    log-probs of given answers. Construct from a model dir (plus adapter) or `from_model`."""

    name = "hf"

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        adapter_dir: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        check_adapter_base: bool = True,
        merge_adapter: bool = False,
        prefix_cache: bool = True,
        max_batch_size: int = 64,
        prefix_cache_entries: int = 8,
        model=None,
        tokenizer=None,
    ):
        if model is None:
            if model_dir is None:
                raise ValueError("HFBackend needs model_dir (or model= and tokenizer=)")
            model, tokenizer = load_model(
                model_dir,
                adapter_dir,
                device=device,
                dtype=dtype,
                check_adapter_base=check_adapter_base,
                merge_adapter=merge_adapter,
            )
        elif tokenizer is None:
            raise ValueError("HFBackend(model=...) also needs tokenizer=")
        self.model = model
        self.tokenizer = tokenizer
        self.model_dir = None if model_dir is None else str(model_dir)
        self.adapter_dir = None if adapter_dir is None else str(adapter_dir)
        self.device = next(model.parameters()).device
        self.prefix_cache_enabled = prefix_cache
        self.max_batch_size = max_batch_size
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = stop_token_ids(tokenizer, model)
        self._prefix_caches: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self._prefix_cache_entries = prefix_cache_entries
        self._system_ids: dict[str, list[int]] = {}
        self._banned: torch.Tensor | None = None
        self.stats = {"prefill_tokens": 0, "cached_prefix_tokens": 0, "generated_tokens": 0}

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs) -> "HFBackend":
        """Wrap a live model (e.g. the policy being trained by PPO) without reloading it."""
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    # ---- tokens -----------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return list(ids)

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """Chat template with add_generation_prompt=True, then the forced prefix's tokens."""
        return self._encode(request).ids

    def _encode(self, request: GenerationRequest) -> _Prompt:
        ids = self._template(list(request.messages), add_generation_prompt=True)
        if request.prefix:
            ids += self.tokenizer.encode(request.prefix, add_special_tokens=False)
        key = None
        messages = request.messages
        if self.prefix_cache_enabled and messages and messages[0].get("role") == "system" and len(messages) > 1:
            text = messages[0].get("content", "")
            sys_ids = self._system_ids.get(text)
            if sys_ids is None:
                sys_ids = self._template([messages[0]], add_generation_prompt=False)
                if len(self._system_ids) > 64:
                    self._system_ids.clear()
                self._system_ids[text] = sys_ids
            if 0 < len(sys_ids) < len(ids) and ids[: len(sys_ids)] == sys_ids:
                key = tuple(sys_ids)
        return _Prompt(ids, key)

    def _banned_ids(self) -> torch.Tensor:
        if self._banned is None:
            self._banned = torch.tensor(plan_opening_token_ids(self.tokenizer), dtype=torch.long, device=self.device)
        return self._banned

    # ---- prefix KV cache --------------------------------------------------------------------
    def _prefix_cache(self, key: tuple[int, ...]):
        cache = self._prefix_caches.get(key)
        if cache is None:
            ids = torch.tensor([list(key)], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # fresh cache
            cache = output_cache(out)
            self.stats["prefill_tokens"] += len(key)
            self._prefix_caches[key] = cache
            while len(self._prefix_caches) > self._prefix_cache_entries:
                self._prefix_caches.popitem(last=False)
        else:
            self._prefix_caches.move_to_end(key)
        return cache

    def clear_prefix_cache(self) -> None:
        self._prefix_caches.clear()

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, seed: int
    ) -> list[Generation]:
        seeds = [row_seed(seed, i) for i in range(len(requests))]
        return self.generate_with_seeds(requests, sampling, seeds)

    def generate_with_seeds(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingParams,
        seeds: Sequence[int],
        logit_bias: dict[int, float] | None = None,
    ) -> list[Generation]:
        """Like `generate`, with an explicit seed per answer and an optional OpenAI-style
        `logit_bias` (token id -> bias added to the logits at every position, all answers; it
        shapes sampling but not the reported log-probs). The server uses this."""
        if len(seeds) != len(requests):
            raise ValueError("one seed per request")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        bias = None
        if logit_bias:
            bad = [t for t in logit_bias if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"logit_bias token ids out of range [0, {vocab}): {bad[:5]}")
            bias = torch.zeros(vocab, device=self.device)
            for token, value in logit_bias.items():
                bias[int(token)] = float(value)
        prompts = [self._encode(r) for r in requests]
        results: list[Generation] = []
        for start in range(0, len(requests), self.max_batch_size):
            end = start + self.max_batch_size
            with _eval_mode(self.model):
                results += self._generate_batch(requests[start:end], prompts[start:end], sampling, seeds[start:end], bias)
        return results

    @torch.no_grad()
    def _generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        prompts: list[_Prompt],
        sampling: SamplingParams,
        seeds: Sequence[int],
        bias: torch.Tensor | None = None,
    ) -> list[Generation]:
        n = len(requests)
        if n == 0:
            return []
        device = self.device
        keys = {p.cache_key for p in prompts}
        shared = next(iter(keys)) if len(keys) == 1 else None
        prefix_len = len(shared) if shared is not None else 0
        suffixes = [p.ids[prefix_len:] for p in prompts]
        width = max(len(s) for s in suffixes)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for row, suffix in enumerate(suffixes):
            ids[row, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
            mask[row, prefix_len + width - len(suffix) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        cache = None
        if shared is not None:
            cache = copy.deepcopy(self._prefix_cache(shared))
            cache.batch_repeat_interleave(n)
            self.stats["cached_prefix_tokens"] += prefix_len * n
        self.stats["prefill_tokens"] += sum(len(s) for s in suffixes)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE_KW: cache}
        )
        cache = output_cache(out)
        logits = out.logits[:, -1, :]
        next_pos = positions[:, -1] + 1

        temperature = float(sampling.temperature)
        greedy = temperature <= 0.0
        scale = 1.0 if greedy else temperature
        generators = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            generators.append(g)
        banned = self._banned_ids() if any(r.forbid_plan for r in requests) else None
        # rows whose answer is still blank: the plan ban applies until the first visible character
        blank = [bool(r.forbid_plan) and not r.prefix.strip() for r in requests]

        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        finish = ["length"] * n
        active = list(range(n))  # original row index of each row still in the batch
        for step in range(int(sampling.max_new_tokens)):
            scaled = logits.float() / scale
            logp_full = torch.log_softmax(scaled, dim=-1)
            masked = scaled if bias is None else scaled + bias
            masked = masked.clone() if banned is not None else masked
            if banned is not None:
                for r, orig in enumerate(active):
                    if blank[orig]:
                        masked[r, banned] = float("-inf")
            if greedy:
                chosen = masked.argmax(dim=-1)
            else:
                probs = torch.softmax(masked, dim=-1)
                if sampling.top_p < 1.0:
                    probs = _top_p(probs, float(sampling.top_p))
                chosen = torch.stack(
                    [torch.multinomial(probs[r], 1, generator=generators[orig])[0] for r, orig in enumerate(active)]
                )
            chosen_logp = logp_full.gather(-1, chosen[:, None]).squeeze(-1)
            chosen_list = chosen.tolist()
            chosen_logp_list = chosen_logp.tolist()
            keep = []
            for r, orig in enumerate(active):
                tok = chosen_list[r]
                tokens[orig].append(tok)
                logps[orig].append(chosen_logp_list[r])
                if tok in self.stop_ids:
                    finish[orig] = "stop"
                    continue
                if blank[orig] and self.tokenizer.decode([tok]).strip():
                    blank[orig] = False
                keep.append(r)
            if not keep or step == int(sampling.max_new_tokens) - 1:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(index)
                mask = mask[index]
                next_pos = next_pos[index]
                chosen = chosen[index]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = self.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{CACHE_KW: cache},
            )
            cache = output_cache(out)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1

        results = []
        for i, request in enumerate(requests):
            body = tokens[i][:-1] if finish[i] == "stop" else tokens[i]
            text = request.prefix + self.tokenizer.decode(body, skip_special_tokens=True)
            self.stats["generated_tokens"] += len(tokens[i])
            results.append(
                Generation(
                    text=text,
                    token_ids=tokens[i],
                    logprobs=logps[i],
                    prompt_token_ids=prompts[i].ids,
                    finish_reason=finish[i],
                )
            )
        return results

    # ---- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        answer_token_ids: Sequence[Sequence[int]],
        temperature: float = 1.0,
        batch_size: int | None = None,
    ) -> list[list[float]]:
        """Log-probs of given answer tokens after given prompts (same convention as `generate`:
        log_softmax(logits / temperature), temperature 0 meaning 1)."""
        size = batch_size or self.max_batch_size
        result: list[list[float]] = []
        for start in range(0, len(prompt_token_ids), size):
            with _eval_mode(self.model):
                chunk = sequence_logprobs(
                    self.model,
                    prompt_token_ids[start : start + size],
                    answer_token_ids[start : start + size],
                    pad_token_id=self.pad_token_id,
                    temperature=temperature,
                )
            result += [t.float().tolist() for t in chunk]
        return result


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering per row: keep the smallest set of tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    drop = (cumulative - sorted_probs) >= top_p  # mass before this token already reached top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)
