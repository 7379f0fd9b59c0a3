"""SFT priming (paper section 4.4): TRL's SFTTrainer with a PEFT LoRA adapter on teacher steps.

Reads top to bottom: checks on the inputs (validated data, base model, adapter, lengths), the
dataset, the trainer (completion-only loss, padding-free batches, gradient accumulation,
checkpoints that resume), training, then the held-out metrics the paper reports (loss, action
accuracy, format validity, plan rate, KL to the base model); last, `sft_stage` wires one run to
MLflow through dynaplan.tracking (never mlflow directly). One trainer subclass
(`sft_trainer_class`): TRL's SFTTrainer with the loss's denominator fixed per dataset and the
shared system prompt run once per batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynaplan.agent.protocol import PLAN_OPEN, parse_output
from dynaplan.config import Params
from dynaplan.train.prefix import first_answer_positions
from dynaplan.train.sft_data import (
    SftExample,
    SftInputError,
    build_examples,
    check_validated,
    decision_weights,
    env_batches,
    read_rows,
    sample_rows,
    sample_train_rows,
    split_by_episode,
)

ADAPTER_META = "dynaplan_adapter.json"  # written beside every adapter and checkpoint we save
FINGERPRINT_FILE = "fingerprint.json"  # in the checkpoint dir: which run its checkpoints belong to

LogFn = Callable[[dict, int], None]
CheckpointFn = Callable[[Path, int], None]


@dataclass(frozen=True)
class SftPaths:
    data_dir: Path  # Parquet shards of step records (the generate stage)
    report: Path  # the validate stage's JSON report (must say success)
    base_dir: Path  # models/base: safetensors + tokenizer + manifest.json
    out_dir: Path  # the final adapter (+ tokenizer and metadata) goes to out_dir/adapter
    checkpoint_dir: Path  # Trainer checkpoints; kept across runs so a killed run resumes


# ---- checks on the inputs ---------------------------------------------------------------------


def base_fingerprint(base_dir: str | os.PathLike[str]) -> str:
    """What identifies a base model: its architecture and the hash of its source weights
    (manifest.json of the base_model stage), else the hash of its weight files."""
    base_dir = Path(base_dir)
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise SftInputError(f"base model dir {base_dir} has no config.json; run `dvc repro base_model` first")
    config = json.loads(config_path.read_text())
    arch = {k: config.get(k) for k in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    manifest = base_dir / "manifest.json"
    source_sha = json.loads(manifest.read_text()).get("sha256") if manifest.is_file() else None
    if source_sha:
        digest.update(source_sha.encode())
    else:
        for weights in sorted(base_dir.glob("*.safetensors")):
            digest.update(weights.name.encode())
            with weights.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def check_adapter_base(adapter_dir: str | os.PathLike[str], base_dir: str | os.PathLike[str]) -> dict:
    """The adapter's metadata, or SftInputError if it was trained on another base model."""
    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / ADAPTER_META
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SftInputError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    if not meta_path.is_file():
        raise SftInputError(f"{adapter_dir} has no {ADAPTER_META}: not an adapter written by dynaplan's SFT")
    meta = json.loads(meta_path.read_text())
    ours = base_fingerprint(base_dir)
    if meta.get("base_fingerprint") != ours:
        raise SftInputError(
            f"adapter {adapter_dir} was trained on base model {meta.get('base_model')!r} "
            f"(fingerprint {meta.get('base_fingerprint')}), but {base_dir} has fingerprint {ours}; "
            "use the base model the adapter was trained on, or train a new adapter"
        )
    return meta


def check_lengths(examples: Sequence[SftExample], lengths: Sequence[int], max_seq_len: int, model_max: int | None) -> None:
    """SftInputError naming the longest example when one exceeds the limit (we never truncate:
    a cut prompt or answer teaches the wrong thing)."""
    limit = min(max_seq_len, model_max) if model_max else max_seq_len
    worst = int(np.argmax(lengths))
    if lengths[worst] > limit:
        ex = examples[worst]
        which = "sft.max_seq_len" if limit == max_seq_len else "the model's max_position_embeddings"
        raise SftInputError(
            f"example {ex.episode_id} step {ex.step} ({ex.env}) is {lengths[worst]} tokens, longer than "
            f"{limit} ({which}); raise sft.max_seq_len (model allows {model_max}) or shorten the prompt "
            "(prompt.history_len, prompt.max_prompt_tokens)"
        )


# The modules whose code decides what a training step computes (the loss, the batches, the
# trainer's settings). A checkpoint written by other code belongs to another run.
TRAINING_CODE = ("sft.py", "sft_data.py", "prefix.py", "format_loss.py")


def training_code_digest() -> str:
    """sha256 of the training modules' source (TRAINING_CODE, beside this file)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in TRAINING_CODE:
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return h.hexdigest()


def run_fingerprint(params: Params, variant: str, examples: Sequence[SftExample], base_fp: str,
                    code_digest: str | None = None) -> str:
    """Everything that decides the training trajectory: a checkpoint of another run is useless.
    The training examples themselves (not only the shards' digest: the prompt params and the
    prompt builder shape them too) and the training code are part of it, so `dvc repro` after
    an edit that changes training retrains instead of resuming a finished run of the old code."""
    data = {
        "variant": variant,
        "sft": params.sft.model_dump(mode="json"),
        "examples": hashlib.sha256(
            json.dumps([ex.as_record() for ex in examples], sort_keys=True).encode()
        ).hexdigest(),
        "base": base_fp,
        "code": code_digest if code_digest is not None else training_code_digest(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---- data ---------------------------------------------------------------------------------------


@dataclass
class SftData:
    train: list[SftExample]
    heldout: list[SftExample]  # the held-out sample used for every held-out metric
    dataset_digest: str
    # per env, (weight of an answer that opens a plan, of one that acts) on the answer's first
    # token (sft.plan_share; None: every token weighs 1)
    decision_weights: dict[str, tuple[float, float]] | None = None


def load_data(params: Params, variant: str, paths: SftPaths) -> SftData:
    report = check_validated(paths.report)
    sft = params.sft
    rows = read_rows(paths.data_dir, sft.envs)
    pool, heldout_rows = split_by_episode(rows, sft.eval_fraction, sft.seed)
    train_rows = sample_train_rows(pool, sft.max_train_examples or len(pool), sft.seed, sft.plan_share)
    # the naive variant trains on the same steps; with no plans there is no decision to weigh
    weights = decision_weights(pool, train_rows) if sft.plan_share > 0 and variant == "dynamic" else None
    heldout_rows = sample_rows(heldout_rows, sft.eval_examples, sft.seed + 1)
    digest = report.get("dataset_digest") or report.get("digest") or _folder_digest(paths.data_dir)
    # The naive prompts are rebuilt under the same token budget the dynamic ones were built with.
    from dynaplan.data.generation import token_counter

    budget = {"max_prompt_tokens": params.prompt.max_prompt_tokens, "count_tokens": token_counter(str(paths.base_dir))}
    return SftData(
        train=build_examples(train_rows, variant, **budget),
        heldout=build_examples(heldout_rows, variant, **budget),
        dataset_digest=str(digest),
        decision_weights=weights,
    )


def _folder_digest(folder: Path) -> str:
    from dynaplan.data.dataset import dataset_digest, file_sha256, shard_paths

    return dataset_digest([(p.name, file_sha256(p)) for p in shard_paths(folder)])


def chat_ids(tokenizer, example: SftExample) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + answer ids) of an example, chat template applied as TRL applies it;
    the answer (the labelled tokens) is the second list after the first."""
    prompt = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(example.prompt + [{"role": "assistant", "content": example.completion}], tokenize=True, return_dict=False)
    return list(prompt), list(full)


def token_lengths(tokenizer, examples: Sequence[SftExample]) -> list[int]:
    """Prompt + completion tokens of each example, chat template applied as TRL applies it."""
    return [len(chat_ids(tokenizer, ex)[1]) for ex in examples]


def answer_lengths(tokenizer, examples: Sequence[SftExample]) -> list[int]:
    """Answer (labelled) tokens of each example."""
    return [len(full) - len(prompt) for prompt, full in (chat_ids(tokenizer, ex) for ex in examples)]


def to_dataset(examples: Sequence[SftExample]):
    from datasets import Dataset

    return Dataset.from_list([ex.as_record() for ex in examples])


# ---- the trainer ----------------------------------------------------------------------------


def make_config(params: Params, output_dir: Path, has_eval: bool):
    """TRL's SFTConfig from our params: every training choice is here, in one place."""
    from trl import SFTConfig

    sft = params.sft
    return SFTConfig(
        output_dir=str(output_dir),
        seed=sft.seed,
        data_seed=sft.seed,
        learning_rate=sft.learning_rate,
        lr_scheduler_type=sft.lr_scheduler,
        warmup_steps=sft.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        weight_decay=sft.weight_decay,
        num_train_epochs=sft.epochs,
        max_steps=sft.max_steps if sft.max_steps > 0 else -1,
        per_device_train_batch_size=sft.batch_size,
        per_device_eval_batch_size=sft.eval_batch_size,
        gradient_accumulation_steps=sft.grad_accum,
        # With the shared-prefix loss the data arrive in env-grouped batches (env_batches).
        train_sampling_strategy="sequential" if uses_shared_prefix(params) else "random",
        # Loss on the answer only; the prompt is context (TRL's prompt-completion format).
        completion_only_loss=True,
        # Padding-free flattens a batch into one row; transformers derives a block-diagonal mask from
        # the restarting position ids, so it is exact with SDPA too (tested against padded batches).
        # We check lengths ourselves (no silent truncation), so TRL's max_length is off with it.
        padding_free=sft.padding_free,
        max_length=None if sft.padding_free else sft.max_seq_len,
        bf16=sft.bf16,
        fp16=False,
        # transformers refuses bf16 off-GPU unless told the CPU is meant (it then uses CPU autocast).
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=sft.gradient_checkpointing,
        save_strategy="steps",
        save_steps=sft.save_steps,
        save_total_limit=sft.save_total_limit,
        logging_steps=sft.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and sft.eval_steps > 0) else "no",
        eval_steps=sft.eval_steps if sft.eval_steps > 0 else None,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def make_lora_config(params: Params, num_layers: int | None = None):
    from peft import LoraConfig

    lora = params.sft.lora
    layers = None
    if lora.top_layers and num_layers:
        # Only the last layers: nothing below them needs a gradient, so backward stops there.
        layers = list(range(max(0, num_layers - lora.top_layers), num_layers))
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_attention(attn_implementation: str) -> None:
    """flash_attention_2 needs the flash-attn package and a CUDA GPU: SftInputError otherwise,
    before the model loads (transformers would raise an ImportError deep inside loading)."""
    import importlib.util

    if attn_implementation != "flash_attention_2":
        return
    missing = [what for what, ok in (("the flash-attn package (`pip install flash-attn`)", importlib.util.find_spec("flash_attn") is not None),
                                      ("a CUDA GPU", torch.cuda.is_available())) if not ok]
    if missing:
        raise SftInputError(
            f"sft.attn_implementation: flash_attention_2 needs {' and '.join(missing)}; install it on the GPU worker, "
            "or set sft.attn_implementation: sdpa with sft.padding_free: false (padding-free batches under sdpa "
            "attend over the whole flattened batch: 0.66x / 0.85x the padded tokens/s for 1B / 8B Llama shapes on "
            "an H100, benchmarks/sft_paper_profile.py)"
        )


def load_base(base_dir: Path, dtype: str = "float32", attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_attention(attn_implementation)

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    return model, tokenizer


@contextlib.contextmanager
def score_labelled_positions_only():
    """TRL's fused LM head projects every position through the vocabulary when Triton is absent
    (a choice for Neuron, which wants fixed shapes); on the CPU, with short answers after long
    prompts, that is most of a training step. Inside this context the CPU takes TRL's own
    compact path (only the positions that have a label), which gives the same loss (tested)."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def labelled_rows(inputs: dict) -> tuple[list[list[int]], list[list[int]]] | None:
    """(prompt ids, answer ids) of each row of a collated, right-padded batch: the answer is the
    labelled run at the end of the row. None when a row does not look like that (then TRL's own
    loss runs)."""
    labels, ids, attention = inputs["labels"].tolist(), inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
    prompts, answers = [], []
    for row_labels, row_ids, row_mask in zip(labels, ids, attention):
        length = int(sum(row_mask))
        marked = [i for i, label in enumerate(row_labels) if label != -100]
        if not marked or marked != list(range(marked[0], length)) or row_labels[marked[0]:length] != row_ids[marked[0]:length]:
            return None
        prompts.append(row_ids[: marked[0]])
        answers.append(row_ids[marked[0]:length])
    return prompts, answers


def prompt_key(prompt: Sequence[int]) -> tuple[int, ...]:
    """The first MIN_SHARED_PREFIX tokens of a prompt: the same for every prompt of one env (its
    system prompt), different between envs. Groups shared-prefix rows and finds a row's env."""
    from dynaplan.train.prefix import MIN_SHARED_PREFIX

    return tuple(prompt[:MIN_SHARED_PREFIX])


def prefix_groups(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Row indices grouped by a common prefix worth sharing (in practice: by env, whose system
    prompts differ), in first-seen order; a row that shares nothing is a group of its own."""
    from dynaplan.train.prefix import MIN_SHARED_PREFIX

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt_key(prompt) if len(prompt) > MIN_SHARED_PREFIX else (-1 - i,), []).append(i)
    return list(groups.values())


def sft_trainer_class():
    """TRL's SFTTrainer with two changes to `compute_loss`, each set by a constructor argument:

    - `loss_tokens_per_step` (sft.loss_normalization: dataset): the summed answer-token loss of a
      step is divided by this constant (the dataset's mean answer tokens per optimizer step)
      instead of by the step's own token count. Every answer token then weighs the same across
      the whole dataset. Dividing by the step's count makes a token weigh less in a step with
      many tokens, and a dynamic step with many tokens is one with plans: it under-weights the
      answers that open a plan (with the default data the loss's fixed point for P(plan) is 7%
      where the teacher plans at 16%; see `plan_rate_fixed_point`).
    - `shared_prefix` (sft.shared_prefix): the batch's common system prompt runs once
      (`dynaplan.train.prefix`): the same loss, gradients and logged metrics (entropy, token
      accuracy, token count) as TRL's own `compute_loss` on the same batch (tested). A batch whose
      rows start with different system prompts runs one shared forward per prompt. Evaluation,
      one-row batches and batches where no two rows share a prefix take TRL's path.

    `lr_decay_ratio` sets the decay of transformers' WSD schedule (sft.lr_scheduler:
    warmup_stable_decay) as a share of the run's optimizer steps, which only the Trainer knows.
    Everything else (collation, masking, accumulation, checkpoints, resume) is TRL's."""
    from trl import SFTTrainer

    from dynaplan.train.prefix import shared_prefix_forward

    class DynaplanSFTTrainer(SFTTrainer):
        def __init__(
            self, *args, shared_prefix: bool = True, loss_tokens_per_step: float | None = None,
            first_token_weights: dict[tuple[int, ...], float] | None = None,
            format_loss: tuple[float, dict[tuple[int, ...], torch.Tensor]] | None = None,
            format_continuations=None, format_continuation_weight: float | None = None,
            lr_decay_ratio: float | None = None, **kwargs,
        ):
            super().__init__(*args, **kwargs)
            self.lr_decay_ratio = lr_decay_ratio  # sft.lr_scheduler: warmup_stable_decay
            self.shared_prefix = shared_prefix
            self.loss_tokens_per_step = loss_tokens_per_step
            self.first_token_weights = first_token_weights
            self.format_loss = format_loss
            self.format_continuations = format_continuations  # sft.format_loss_scope: outside_plan or plan_breaks
            self.format_continuation_weight = format_continuation_weight  # None: the first token's weight

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            # transformers' WSD schedule takes its decay as a step count, known only here
            if self.lr_scheduler is None and self.lr_decay_ratio is not None and self.args.lr_scheduler_type == "warmup_stable_decay":
                decay = max(1, round(self.lr_decay_ratio * num_training_steps))
                self.args.lr_scheduler_kwargs = {"num_decay_steps": decay, "decay_type": "linear"}
            return super().create_scheduler(num_training_steps, optimizer)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.loss_tokens_per_step is not None and num_items_in_batch is not None and self.model.training:
                num_items_in_batch = torch.as_tensor(float(self.loss_tokens_per_step))
            rows = None
            if self.shared_prefix and self.model.training and not return_outputs and {"labels", "attention_mask"} <= set(inputs):
                rows = labelled_rows(inputs)
            groups = prefix_groups(rows[0]) if rows is not None else []
            # sft.plan_share: only this path weighs the first answer token, so weighted training
            # takes it for every batch (a one-row batch is one plain forward here, TRL's loss)
            weighted = (self.first_token_weights is not None or self.format_loss is not None) and self.model.training
            if weighted and not groups:
                raise RuntimeError(
                    "sft.plan_share and sft.format_loss_weight score each answer's first token, which only the "
                    "shared-prefix loss does, but this training batch is not a batch of prompts followed by labelled answers"
                )
            if not weighted and not any(len(g) > 1 for g in groups):
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            pad_id = self.processing_class.pad_token_id
            nll = valid = entropy = correct = format_nll = outside_nll = 0.0
            for group in groups:  # one forward per system prompt (a batch that spans two envs: two)
                out = shared_prefix_forward(
                    model, [rows[0][i] for i in group], [rows[1][i] for i in group], pad_id=pad_id if pad_id is not None else 0
                )
                logp_all = torch.log_softmax(out.answer_logits(model), dim=-1)
                weight = out.mask
                if self.first_token_weights is not None:
                    weight = first_token_weighting(out.mask, [rows[0][i] + rows[1][i] for i in group], self.first_token_weights)
                nll = nll - (logp_all.gather(-1, out.targets.unsqueeze(-1)).squeeze(-1) * weight).sum()
                if self.format_loss is not None and self.model.training:
                    start_nll = valid_start_nll(logp_all, out.mask, self.format_loss[1], rows[0][group[0]])
                    nll = nll + self.format_loss[0] * start_nll.sum()
                    format_nll += start_nll.detach().sum().item()
                    if self.format_continuations is not None:
                        rest_nll = self.format_continuations.nll(logp_all, out.mask, prompt_key(rows[0][group[0]]), [rows[1][i] for i in group])
                        rest_weight = self.format_loss[0] if self.format_continuation_weight is None else self.format_continuation_weight
                        nll = nll + rest_weight * rest_nll.sum()
                        outside_nll += rest_nll.detach().sum().item()
                with torch.no_grad():  # TRL's training metrics, over the same answer tokens
                    valid += out.mask.sum().item()
                    entropy += (-(logp_all.exp() * logp_all).sum(-1) * out.mask).sum().item()
                    correct += ((logp_all.argmax(-1) == out.targets).float() * out.mask).sum().item()
            num_tokens = valid if num_items_in_batch is None else num_items_in_batch
            loss = nll / torch.as_tensor(num_tokens).clamp(min=1)
            self._metrics["train"]["entropy"].append(entropy / valid if valid > 0 else 0.0)
            self._metrics["train"]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
            if self.format_loss is not None:  # mean -log P(valid first token) over the batch's answers
                self._metrics["train"]["valid_start_nll"].append(format_nll / len(rows[0]))
            if self.format_continuations is not None:  # the same at the later scored positions (format_loss_scope)
                self._metrics["train"]["valid_continuation_nll"].append(outside_nll / len(rows[0]))
            self._total_train_tokens += int(inputs["attention_mask"].sum().item())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return DynaplanSFTTrainer


def valid_start_nll(
    logp: torch.Tensor, mask: torch.Tensor, start_ids: dict[tuple[int, ...], torch.Tensor], prompt: Sequence[int]
) -> torch.Tensor:
    """[B]: -log P(first answer token can begin a valid answer) of each row of one shared-prefix
    group (`logp` [B, G, V] log-probs of right-aligned answers, `mask` [B, G]); the valid first
    tokens are those of the env whose prompt starts like `prompt` (`start_ids`, keyed by
    `prompt_key`)."""
    key = prompt_key(prompt)
    if key not in start_ids:
        raise RuntimeError(f"sft.format_loss_weight: a training row starts with a prompt of no known env ({len(prompt)} tokens)")
    first = first_answer_positions(mask)
    rows = torch.arange(logp.shape[0], device=logp.device)
    return -torch.logsumexp(logp[rows, first][:, start_ids[key].to(logp.device)], dim=-1)


def env_prompt_keys(chat: dict, examples: Sequence[SftExample]) -> dict[str, set[tuple[int, ...]]]:
    """Each env's `prompt_key`s (`chat`: `chat_ids` by example id): how the format loss finds a
    row's env. An error when two envs' prompts start alike."""
    by_env: dict[str, set[tuple[int, ...]]] = {}
    for ex in examples:
        by_env.setdefault(ex.env, set()).add(prompt_key(chat[id(ex)][0]))
    keys = [key for env_keys in by_env.values() for key in env_keys]
    if len(set(keys)) != len(keys):
        raise SftInputError(f"sft.format_loss_weight: prompts of different envs ({', '.join(sorted(by_env))}) start with the same tokens")
    return by_env


def format_start_ids(tokenizer, chat: dict, examples: Sequence[SftExample], params: Params) -> dict[tuple[int, ...], torch.Tensor]:
    """Each env's valid first answer tokens (`valid_prefix_token_ids`), keyed by the
    `prompt_key` of its prompts (`chat`: `chat_ids` by example id)."""
    from dynaplan.models.hf import valid_prefix_token_ids

    by_env = env_prompt_keys(chat, examples)
    ids = {env: torch.tensor(valid_prefix_token_ids(tokenizer, _action_names(env, params)), dtype=torch.long) for env in by_env}
    return {key: ids[env] for env, env_keys in by_env.items() for key in env_keys}


def format_continuations(tokenizer, chat: dict, examples: Sequence[SftExample], params: Params, model):
    """The valid next tokens outside the plan text (`ValidContinuations`) when the format loss
    reaches past the first token (sft.format_loss_scope: outside_plan, plan_breaks), else None."""
    sft = params.sft
    if sft.format_loss_scope == "first_token" or sft.format_loss_weight <= 0:  # the format loss off: no scope
        return None
    from dynaplan.train.format_loss import ValidContinuations

    actions = {key: _action_names(env, params) for env, keys in env_prompt_keys(chat, examples).items() for key in keys}
    return ValidContinuations(tokenizer, actions, model.get_output_embeddings().weight.shape[0], plan_breaks=sft.format_loss_scope == "plan_breaks")


def first_token_weighting(mask: torch.Tensor, sequences: Sequence[Sequence[int]], weights: dict[tuple[int, ...], float]) -> torch.Tensor:
    """`mask` ([B, G], right-aligned answers) with each row's first answer token scaled by its
    sequence's weight (`weights`, keyed by the row's prompt + answer token ids)."""
    weighted = mask.clone().float()
    first = first_answer_positions(mask)
    for row, ids in enumerate(sequences):
        key = tuple(ids)
        if key not in weights:
            raise RuntimeError(f"sft.plan_share: a training row of {len(key)} tokens is not one of the weighted examples")
        weighted[row, first[row]] *= weights[key]
    return weighted


def example_first_token_weights(
    examples: Sequence[SftExample], opens_plan: Sequence[bool], decision: dict[str, tuple[float, float]]
) -> list[float]:
    """Each example's first-token weight: its env's weight of planned steps if its answer opens a
    plan (`opens_plan`), else of acting steps."""
    return [decision[ex.env][0 if opens else 1] for ex, opens in zip(examples, opens_plan)]


def weights_by_token_ids(full_ids: Sequence[Sequence[int]], weights: Sequence[float]) -> dict[tuple[int, ...], float]:
    """Each example's prompt + answer token ids (`chat_ids`) -> its weight: how the trainer finds
    a collated row's weight whatever the data order."""
    return {tuple(ids): weight for ids, weight in zip(full_ids, weights)}


def loss_tokens_per_step(params: Params, answer_tokens: Sequence[int]) -> float | None:
    """The constant denominator of a step's loss under sft.loss_normalization: dataset (None under
    batch: TRL's per-step count). Under `accelerate launch` with TRL's default
    average_tokens_across_devices the trainer scales each process's loss by the number of
    processes, so the constant counts the tokens of every process's batches."""
    from accelerate import PartialState

    sft = params.sft
    if sft.loss_normalization == "batch":
        return None
    return float(np.mean(answer_tokens)) * sft.batch_size * sft.grad_accum * PartialState().num_processes


def plan_rate_fixed_point(
    planned: Sequence[bool], answer_tokens: Sequence[int], batch_size: int, normalization: str,
    first_token_weights: Sequence[float] | None = None,
) -> float:
    """The plan rate at which the expected gradient of the decision "open a plan or not" is zero,
    for examples in this order, cut into batches of `batch_size` (the training order when it is
    fixed, as with the shared prefix): each example weighs 1/(answer tokens of its batch) under
    `batch` normalization, the same under `dataset` (then it is the targets' own rate), times its
    first-token weight (sft.plan_share: then the rate of the pool the sample was drawn from)."""
    y = np.asarray(planned, dtype=float)
    tokens = np.asarray(answer_tokens, dtype=float)
    if normalization == "dataset":
        weights = np.ones_like(y)
    else:
        per_batch = np.array([tokens[i : i + batch_size].sum() for i in range(0, len(tokens), batch_size)])
        weights = 1.0 / np.repeat(per_batch, batch_size)[: len(y)]
    if first_token_weights is not None:
        weights = weights * np.asarray(first_token_weights, dtype=float)
    return float((weights * y).sum() / weights.sum()) if len(y) else 0.0


def uses_shared_prefix(params: Params) -> bool:
    """The shared-prefix loss applies: asked for, 2+ rows per batch, one process (it calls the
    model's decoder directly, which DDP would not see), no gradient checkpointing (no cache)."""
    from accelerate import PartialState

    return params.sft.shared_prefix_possible and PartialState().num_processes == 1


@contextlib.contextmanager
def preserved_rng():
    """Python's, NumPy's and torch's (CPU and every CUDA device's) random states as they were on
    entry, whatever the body draws. Registering a checkpoint loads the model (MLflow checks the
    input example; PEFT initializes LoRA weights before loading them), which draws from torch's
    generator: without this the dropout masks of the steps after a checkpoint would depend on
    whether it was registered, and a resumed run (which restores the state saved with the
    checkpoint) would not repeat an uninterrupted one."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _trainer_callbacks(log: LogFn | None, on_checkpoint: CheckpointFn | None, adapter_meta: dict):
    from transformers import TrainerCallback

    class TrackingCallback(TrainerCallback):
        """Per-step train and eval logs to `log`; metadata beside, and a hook after, each checkpoint."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if log is not None and logs:
                prefix = "eval" if any(k.startswith("eval_") for k in logs) else "train"
                clean = {k.removeprefix("eval_"): v for k, v in logs.items() if isinstance(v, (int, float))}
                log({f"{prefix}.{k}": v for k, v in clean.items()}, state.global_step)

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                meta = {**adapter_meta, "global_step": state.global_step, "checkpoint": True}
                (checkpoint / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                if on_checkpoint is not None:
                    with preserved_rng():  # the training run's draws do not depend on the hook
                        on_checkpoint(checkpoint, state.global_step)

    return [TrackingCallback()]


def _prepare_checkpoint_dir(checkpoint_dir: Path, fingerprint: str, base_dir: Path) -> str | None:
    """The checkpoint to resume from, if this run's; checkpoints of another run are cleared."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = checkpoint_dir / FINGERPRINT_FILE
    if checkpoint_dir.is_dir():
        previous = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        if previous != fingerprint:
            # Params, examples, base model or training code changed: another run's checkpoints.
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    while (last := get_last_checkpoint(str(checkpoint_dir))) is not None:
        if (Path(last) / "trainer_state.json").is_file() and (Path(last) / ADAPTER_META).is_file():
            check_adapter_base(last, base_dir)
            return last
        # Killed while saving: the trainer state (written last) is missing; use the one before.
        shutil.rmtree(last)
    return None


def planned_checkpoint_steps(total_steps: int, save_steps: int) -> list[int]:
    """The steps the trainer saves a checkpoint at: every save_steps, and the last step."""
    return sorted({*range(save_steps, total_steps + 1, save_steps), total_steps}) if total_steps > 0 else []


def check_average_checkpoints(params: Params, total_steps: int) -> None:
    """SftInputError before training when the run saves fewer checkpoints than it must average."""
    n, save = params.sft.average_checkpoints, params.sft.save_steps
    saved = planned_checkpoint_steps(total_steps, save)
    if n > len(saved):
        raise SftInputError(
            f"sft.average_checkpoints={n} averages the last {n} checkpoints, but a run of {total_steps} optimizer steps "
            f"with sft.save_steps={save} saves {len(saved)} ({saved}): lower sft.save_steps or sft.average_checkpoints"
        )


def average_checkpoints(model, checkpoint_dir: Path, count: int, final_step: int):
    """A PeftModel on `model`'s base whose one adapter ("default") is the exact mean of the LoRA
    weight deltas of the last `count` checkpoints up to `final_step`: PEFT's add_weighted_adapter
    with combination 'cat' stacks their A (scaled) and B matrices into one adapter of rank
    count x r, so its delta is sum_k w_k * scaling * B_k A_k with w_k = 1/count. Along a run whose
    one-token decisions swing between checkpoints (README, SFT probes) the mean sits nearer
    their centre than the last step does. Returns (model, the averaged steps)."""
    from peft import PeftModel

    steps = sorted(int(p.name.rsplit("-", 1)[-1]) for p in checkpoint_dir.glob("checkpoint-*")
                   if (p / "adapter_model.safetensors").is_file())
    chosen = [s for s in steps if s <= final_step][-count:]
    if len(chosen) < count or chosen[-1] != final_step:
        raise RuntimeError(
            f"sft.average_checkpoints={count} needs the checkpoints of the last {count} saves up to step {final_step} "
            f"in {checkpoint_dir}; found steps {steps}"
        )
    names = [f"step-{s}" for s in chosen]
    averaged = PeftModel.from_pretrained(model.unload(), str(checkpoint_dir / f"checkpoint-{chosen[0]}"), adapter_name=names[0])
    for step, name in zip(chosen[1:], names[1:]):
        averaged.load_adapter(str(checkpoint_dir / f"checkpoint-{step}"), adapter_name=name)
    averaged.add_weighted_adapter(names, [1.0 / count] * count, "default", combination_type="cat")
    averaged.set_adapter("default")
    for name in names:
        averaged.delete_adapter(name)
    return averaged, chosen


def _write_adapter(model, tokenizer, out_dir: Path, meta: dict) -> Path:
    """The final adapter, tokenizer (chat template) and metadata, written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "adapter"
    tmp = out_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


@dataclass
class SftResult:
    adapter_dir: Path
    metrics: dict
    resumed_from_step: int | None
    global_step: int
    dataset_digest: str
    base_fingerprint: str
    train_tokens_per_second: float


def run_sft(
    params: Params,
    variant: str,
    paths: SftPaths,
    *,
    log: LogFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    data: SftData | None = None,
) -> SftResult:
    """Train (or resume) one variant and measure it on held-out steps. Raises SftInputError before
    any training when an input is wrong."""
    sft = params.sft
    # 1. Inputs: validated data, a base model, examples that fit.
    data = data or load_data(params, variant, paths)
    base_fp = base_fingerprint(paths.base_dir)
    model, tokenizer = load_base(paths.base_dir, sft.model_dtype, sft.attn_implementation)
    # the chat template once per example: lengths, answer token counts and weight keys come from it
    chat = {id(ex): chat_ids(tokenizer, ex) for ex in data.train + data.heldout}
    lengths = [len(chat[id(ex)][1]) for ex in data.train + data.heldout]
    check_lengths(data.train + data.heldout, lengths, sft.max_seq_len, getattr(model.config, "max_position_embeddings", None))
    fingerprint = run_fingerprint(params, variant, data.train, base_fp)
    from accelerate import PartialState

    # Under `accelerate launch`, rank 0 clears stale checkpoints before the others look.
    with PartialState().main_process_first():
        resume_from = _prepare_checkpoint_dir(paths.checkpoint_dir, fingerprint, paths.base_dir)
    meta = {
        "stage": "sft",
        "variant": variant,
        "base_model": params.model.base,
        "base_fingerprint": base_fp,
        "dataset_digest": data.dataset_digest,
        "run_fingerprint": fingerprint,
    }

    # 2. The trainer: TRL does tokenization, masking, batching, accumulation, checkpoints.
    shared = uses_shared_prefix(params)
    config = make_config(params, paths.checkpoint_dir, has_eval=bool(data.heldout))
    train_examples = data.train
    if shared:
        # One env per batch (one system prompt to share), in a seeded order the trainer keeps,
        # so a resumed run skips exactly the batches it had trained on (make_config: sequential).
        train_examples = env_batches(
            data.train, sft.batch_size, sft.seed, lengths=lengths[: len(data.train)], window=sft.length_group_batches,
            balance_plans=sft.balance_plan_batches and variant == "dynamic", plan_tolerance=sft.plan_batch_tolerance,
        )
    answer_tokens = [len(chat[id(ex)][1]) - len(chat[id(ex)][0]) for ex in train_examples]
    target_plans = [ex.completion.lstrip().startswith(PLAN_OPEN) for ex in train_examples]
    for key, on, does in (
        ("plan_share", data.decision_weights is not None, "weighs"),
        ("format_loss_weight", sft.format_loss_weight > 0, "scores"),
    ):
        if on and not shared:
            raise SftInputError(
                f"sft.{key} {does} each answer's first token, which only the shared-prefix loss does; "
                f"it does not run here (several processes?): set sft.{key}: 0"
            )
    first_weights = None
    if data.decision_weights is not None:
        first_weights = example_first_token_weights(train_examples, target_plans, data.decision_weights)
    trainer = sft_trainer_class()(
        model=model,
        args=config,
        train_dataset=to_dataset(train_examples),
        eval_dataset=to_dataset(data.heldout) if sft.eval_steps > 0 else None,
        processing_class=tokenizer,
        peft_config=make_lora_config(params, model.config.num_hidden_layers),
        callbacks=_trainer_callbacks(log, on_checkpoint, meta),
        shared_prefix=shared,
        loss_tokens_per_step=loss_tokens_per_step(params, answer_tokens),
        first_token_weights=None if first_weights is None else weights_by_token_ids([chat[id(ex)][1] for ex in train_examples], first_weights),
        format_loss=(sft.format_loss_weight, format_start_ids(tokenizer, chat, train_examples, params)) if sft.format_loss_weight > 0 else None,
        format_continuations=format_continuations(tokenizer, chat, train_examples, params, model),
        format_continuation_weight=sft.format_loss_continuation_weight,
        lr_decay_ratio=sft.lr_decay_ratio,
    )

    if sft.average_checkpoints > 1:
        # the Trainer's own count: optimizer steps per epoch (a short last accumulation counts) x epochs
        per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / sft.grad_accum), 1)
        check_average_checkpoints(params, sft.max_steps if sft.max_steps > 0 else math.ceil(sft.epochs * per_epoch))

    # 3. Train, resuming optimizer, scheduler, RNG and data order from the last checkpoint.
    started = time.perf_counter()
    with score_labelled_positions_only():
        output = trainer.train(resume_from_checkpoint=resume_from)
    elapsed = time.perf_counter() - started
    resumed_step = int(Path(resume_from).name.split("-")[-1]) if resume_from else None
    trained_tokens = float(trainer._total_train_tokens)  # tokens seen in this process (TRL's count)
    if not trainer.is_world_process_zero():
        # Other ranks of `accelerate launch` only train their shard; rank 0 saves and measures.
        return SftResult(paths.out_dir / "adapter", {}, resumed_step, int(trainer.state.global_step),
                         data.dataset_digest, base_fp, 0.0)
    model, averaged_steps = trainer.model, None
    if sft.average_checkpoints > 1:
        model, averaged_steps = average_checkpoints(model, paths.checkpoint_dir, sft.average_checkpoints, int(trainer.state.global_step))
    adapter_dir = _write_adapter(model, tokenizer, paths.out_dir, {**meta, "global_step": trainer.state.global_step,
                                                                    **({"averaged_steps": averaged_steps} if averaged_steps else {})})

    # 4. Held-out metrics: the paper's SFT measurements.
    model.eval()
    metrics = heldout_metrics(model, tokenizer, data.heldout, params)
    metrics.update(
        {
            "train_loss": float(output.training_loss),
            "global_step": int(trainer.state.global_step),
            "train_examples": len(data.train),
            "train_target_plan_rate": float(np.mean(target_plans)),
            # where the loss pulls the plan decision (see sft_trainer_class): the targets' own rate
            # under sft.loss_normalization dataset, less under batch
            "loss_plan_rate_fixed_point": plan_rate_fixed_point(
                target_plans, answer_tokens, sft.batch_size, sft.loss_normalization, first_weights
            ),
            "train_tokens_per_second": trained_tokens / elapsed if elapsed > 0 else 0.0,
            "train_seconds": elapsed,
            "resumed_from_step": resumed_step if resumed_step is not None else -1,
            "averaged_checkpoints": len(averaged_steps) if averaged_steps else 1,
        }
    )
    if log is not None:
        log({f"heldout.{k}": v for k, v in metrics.items()}, int(trainer.state.global_step))
    return SftResult(
        adapter_dir=adapter_dir,
        metrics=metrics,
        resumed_from_step=resumed_step,
        global_step=int(trainer.state.global_step),
        dataset_digest=data.dataset_digest,
        base_fingerprint=base_fp,
        train_tokens_per_second=metrics["train_tokens_per_second"],
    )


# ---- held-out metrics ---------------------------------------------------------------------------


def _action_names(env: str, params: Params) -> tuple[str, ...]:
    from dynaplan.envs import make_env

    if env == "pogs":
        # POGS actions are node ids; the node count fixes them (no need to build a graph).
        return tuple(str(i) for i in range(params.envs.pogs.num_nodes))
    return tuple(make_env(env).action_names)


@torch.no_grad()
def completion_stats(
    model, tokenizer, examples: Sequence[SftExample], batch_size: int, actions: dict[str, tuple[str, ...]] | None = None,
) -> dict:
    """Teacher-forced over the held-out completions, adapter on and off (PEFT's disable_adapter,
    no second model): mean token NLL, token-level KL(student || base), and the student's and
    base's probability that the answer opens a plan (the plan rate when sampling at T=1).
    Given each env's `actions`, also the probability that the first answer token can begin a
    valid answer (`valid_start_prob`, and per env): at T=1, top-p 1, an upper bound on the share
    of valid answers that sampling noise does not blur.
    Batches hold one env's prompts, whose system prompt runs once (`shared_prefix_forward`)."""
    from dynaplan.models.hf import plan_opening_token_ids, valid_prefix_token_ids
    from dynaplan.train.prefix import shared_prefix_forward

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan_first_ids = torch.tensor(plan_opening_token_ids(tokenizer), dtype=torch.long)
    nll_sum = kl_sum = 0.0
    tokens = 0
    plan_prob_student: list[float] = []
    plan_prob_base: list[float] = []
    valid_start: dict[str, dict[str, list[float]]] = {}
    for env in sorted({ex.env for ex in examples}):
        group = [ex for ex in examples if ex.env == env]
        start_ids = torch.tensor(valid_prefix_token_ids(tokenizer, actions[env]), dtype=torch.long) if actions else None
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            prompts, fulls = zip(*(chat_ids(tokenizer, ex) for ex in batch))
            answers = [f[len(p):] for p, f in zip(prompts, fulls)]
            out = shared_prefix_forward(model, prompts, answers, pad_id=pad_id)
            student = torch.log_softmax(out.answer_logits(model), dim=-1)
            with model.disable_adapter():
                out = shared_prefix_forward(model, prompts, answers, pad_id=pad_id)
                base = torch.log_softmax(out.answer_logits(model), dim=-1)
            mask = out.mask.bool()
            nll_sum -= float(student.gather(-1, out.targets.unsqueeze(-1)).squeeze(-1)[mask].sum())
            kl_sum += float((student.exp() * (student - base)).sum(-1)[mask].sum())
            tokens += int(mask.sum())
            first = first_answer_positions(out.mask)
            rows = torch.arange(len(batch), device=first.device)
            student_first, base_first = student[rows, first].exp(), base[rows, first].exp()
            plan_prob_student.extend(student_first[:, plan_first_ids].sum(-1).tolist())
            plan_prob_base.extend(base_first[:, plan_first_ids].sum(-1).tolist())
            if start_ids is not None:
                probs = valid_start.setdefault(env, {"student": [], "base": []})
                probs["student"].extend(student_first[:, start_ids].sum(-1).tolist())
                probs["base"].extend(base_first[:, start_ids].sum(-1).tolist())
    starts = {}
    if valid_start:
        starts = {
            "valid_start_prob": float(np.mean([p for v in valid_start.values() for p in v["student"]])),
            "base_valid_start_prob": float(np.mean([p for v in valid_start.values() for p in v["base"]])),
            "valid_start_prob_per_env": {env: float(np.mean(v["student"])) for env, v in valid_start.items()},
        }
    return {
        "loss": nll_sum / max(tokens, 1),
        "kl_to_base": kl_sum / max(tokens, 1),
        "kl_to_base_per_answer": kl_sum / max(len(examples), 1),
        "plan_prob": float(np.mean(plan_prob_student)) if plan_prob_student else 0.0,
        "base_plan_prob": float(np.mean(plan_prob_base)) if plan_prob_base else 0.0,
        "completion_tokens": tokens,
        **starts,
    }


def sample_answers(
    model, tokenizer, prompts: Sequence[list[dict]], max_new_tokens: int, batch_size: int,
    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
) -> list[str]:
    """Answers through the hf backend (the decode loop evaluation and PPO use): greedy at
    temperature 0, else sampled as evaluation samples."""
    from dynaplan.models.base import GenerationRequest, SamplingParams
    from dynaplan.models.hf import HFBackend

    backend = HFBackend.from_model(model, tokenizer, max_batch_size=batch_size)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    return [g.text for g in backend.generate([GenerationRequest(messages=list(p)) for p in prompts], sampling, seed=seed)]


def answer_scores(answers: Sequence[str], examples: Sequence[SftExample], actions: dict[str, tuple[str, ...]]) -> dict:
    """Action accuracy against the teacher, strict format validity and plan rate of answers."""
    parsed = [parse_output(text, actions[ex.env]) for text, ex in zip(answers, examples)]
    return {
        "action_accuracy": float(np.mean([p.action == ex.action for p, ex in zip(parsed, examples)])),
        "format_valid": float(np.mean([p.valid for p in parsed])),
        "plan_rate": float(np.mean([text.lstrip().startswith(PLAN_OPEN) for text in answers])),
    }


def heldout_metrics(model, tokenizer, examples: Sequence[SftExample], params: Params) -> dict:
    """Held-out loss, KL to base, and answers scored against the teacher: next-action accuracy,
    format validity (the strict protocol) and plan rate (student vs teacher), of greedy answers
    and of `sft.eval_samples` answers per prompt sampled as evaluation samples
    (evaluate.temperature, top_p): a plan taken at random intervals is a coin the student must
    learn to toss, which greedy decoding never shows."""
    sft = params.sft
    actions = {env: _action_names(env, params) for env in {ex.env for ex in examples}}
    stats = completion_stats(model, tokenizer, examples, sft.eval_batch_size, actions)
    prompts = [ex.prompt for ex in examples]
    answers = sample_answers(model, tokenizer, prompts, sft.eval_max_new_tokens, sft.eval_batch_size)
    per_env = {}
    for env in sorted(actions):
        idx = [i for i, ex in enumerate(examples) if ex.env == env]
        per_env[env] = {
            **answer_scores([answers[i] for i in idx], [examples[i] for i in idx], actions),
            "teacher_plan_rate": float(np.mean([examples[i].planned for i in idx])),
            "valid_start_prob": stats["valid_start_prob_per_env"][env],
            "examples": len(idx),
        }
    sampled = {}
    if sft.eval_samples:
        repeated = [ex for ex in examples for _ in range(sft.eval_samples)]
        drawn = sample_answers(
            model, tokenizer, [ex.prompt for ex in repeated], sft.eval_max_new_tokens, sft.eval_batch_size,
            temperature=params.evaluate.temperature, top_p=params.evaluate.top_p, seed=sft.seed,
        )
        sampled = {f"sampled_{k}": v for k, v in answer_scores(drawn, repeated, actions).items()}
    return {
        "heldout_loss": stats["loss"],
        "kl_to_base": stats["kl_to_base"],
        "kl_to_base_per_answer": stats["kl_to_base_per_answer"],
        **answer_scores(answers, examples, actions),
        **sampled,
        "plan_prob": stats["plan_prob"],
        "base_plan_prob": stats["base_plan_prob"],
        "valid_start_prob": stats["valid_start_prob"],
        "base_valid_start_prob": stats["base_valid_start_prob"],
        "teacher_plan_rate": float(np.mean([ex.planned for ex in examples])),
        "heldout_examples": len(examples),
        "per_env": per_env,
        "answers_sample": [{"answer": a, "teacher": ex.completion} for a, ex in list(zip(answers, examples))[:5]],
    }


# ---- the stage: training wired to MLflow (through dynaplan.tracking) -----------------------------


def sft_stage(params: Params, variant: str, paths: SftPaths, metrics_path: Path) -> dict:
    """One `sft@<variant>` execution: a tracked run that trains (or resumes), logs per-step and
    final metrics, registers saved checkpoints (sft.register_checkpoints) and the final adapter
    as versions of `dynaplan-agent`, and writes the metrics JSON (the DVC metric) atomically."""
    from dynaplan import tracking

    example_prompt: list[dict] = []

    def register(adapter_dir: Path, step: int, final: bool, metrics: dict | None = None):
        info = tracking.log_agent_model(
            adapter_dir,
            paths.base_dir,
            example_messages=example_prompt,
            base_model=params.model.base,
            name=f"sft-{variant}-{'final' if final else f'step-{step}'}",
            max_new_tokens=params.prompt.max_new_tokens,
            step=step,
        )
        meta = json.loads((adapter_dir / ADAPTER_META).read_text())
        version = tracking.register_agent(
            info.model_uri,
            stage="sft",
            variant=variant,
            base_model=params.model.base,
            dataset_digest=meta["dataset_digest"],
            extra_tags={"global_step": str(step), "final": str(final).lower(), "base_fingerprint": meta["base_fingerprint"],
                        **({"averaged_steps": ",".join(map(str, meta["averaged_steps"]))} if meta.get("averaged_steps") else {})},
        )
        if metrics:
            tracking.set_version_metrics(version.version, metrics, prefix="sft.")
        return version

    def on_checkpoint(checkpoint: Path, step: int) -> None:
        if params.sft.register_checkpoints:
            register(checkpoint, step, final=False)

    from accelerate import PartialState

    # Bad data is a usage error before any MLflow run is opened.
    data = load_data(params, variant, paths)
    if not PartialState().is_main_process:
        return run_sft(params, variant, paths, data=data).metrics  # rank 0 records and registers
    # The registered model's input example: a real held-out prompt of this variant.
    example_prompt.extend(data.heldout[0].prompt)
    with tracking.stage_run(f"sft@{variant}", {"sft": params.sft, "model": params.model}, variant=variant):
        # MLflow caps a dataset digest at 36 characters: the first 32 of our sha256 name it.
        tracking.log_dataset(paths.data_dir, name="teacher-steps", digest=data.dataset_digest[:32], context="training")
        result = run_sft(params, variant, paths, log=tracking.log_metrics, on_checkpoint=on_checkpoint, data=data)
        scalars = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        version = register(result.adapter_dir, result.global_step, final=True, metrics=scalars)
        out = {
            **result.metrics,
            "variant": variant,
            "model_version": str(version.version),
            "model_uri": f"models:/{tracking.AGENT_MODEL}/{version.version}",
            "dataset_digest": result.dataset_digest,
        }
        tmp = metrics_path.with_name(f".{metrics_path.name}.tmp-{os.getpid()}")
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, metrics_path)
        tracking.log_artifact(metrics_path)
    return out
