"""Training throughput of the `sft` stage's trainer against a plain SFTTrainer script, side by side.

Same data (the teacher steps of `data/teacher`, or a small generated set), same model
(`model.dir`), same LoRA, batch size and accumulation. Prints non-padding training tokens per
second of both, their ratio (target >= 0.95x), the share of non-padding tokens in our batches
(target >= 90%) and, with --bf16-check, the loss curves with bf16 autocast on and off.

    python benchmarks/sft_throughput.py --steps 6
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time and non-padding tokens of each optimizer step (the first is warm-up, dropped)."""

    def __init__(self):
        self.starts, self.ends, self.losses = [], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def batch_stats(trainer, batches: int, shared: bool) -> tuple[int, int, int]:
    """(non-padding tokens, positions the forward computes, tokens) over the first `batches`
    training batches (see shared_positions)."""
    from dynaplan.train.sft import labelled_rows, prefix_groups

    real = total = tokens = 0
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i >= batches:
            break
        if "attention_mask" not in batch:  # padding-free: one row, no padding
            real += batch["input_ids"].numel()
            total += batch["input_ids"].numel()
            tokens += batch["input_ids"].numel()
            continue
        tokens += int(batch["attention_mask"].sum())
        rows = labelled_rows(batch) if shared and "labels" in batch else None
        groups = prefix_groups(rows[0]) if rows and len(rows[0]) > 1 else []
        if not any(len(g) > 1 for g in groups):  # the trainer runs TRL's padded forward
            real += int(batch["attention_mask"].sum())
            total += batch["attention_mask"].numel()
            continue
        batch_real, batch_total = shared_positions(*rows)
        real, total = real + batch_real, total + batch_total
    return real, total, tokens


def shared_positions(prompts, answers) -> tuple[int, int]:
    """(non-padding, computed) positions of one batch on the shared-prefix path: each group of
    rows with one system prompt (as the trainer groups them) computes its common prefix once
    plus each row's rest, right-padded to the group's longest rest."""
    from dynaplan.train.prefix import shared_prefix_run_once
    from dynaplan.train.sft import prefix_groups

    real = total = 0
    for group in prefix_groups(prompts):
        lengths = [len(prompts[j]) + len(answers[j]) for j in group]
        prefix = shared_prefix_run_once([prompts[j] for j in group])
        rests = [n - prefix for n in lengths]
        real += prefix + sum(rests)
        total += prefix + len(rests) * max(rests)
    return real, total


def epoch_padding(examples, tokenizer, batch_size: int) -> float:
    """Non-padding share of the positions computed over one epoch of the `sft` stage's batches
    (its training sample in its env-grouped, length-sorted order), tokenized as TRL does."""
    from dynaplan.train.sft import chat_ids

    real = total = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts, fulls = zip(*(chat_ids(tokenizer, ex) for ex in batch))
        batch_real, batch_total = shared_positions(prompts, [f[len(p):] for p, f in zip(prompts, fulls)])
        real, total = real + batch_real, total + batch_total
    return real / total


def run(trainer, steps: int, patched: bool, shared: bool = False):
    from dynaplan.train.sft import score_labelled_positions_only

    timer = StepTimer()
    trainer.add_callback(timer)
    real, total, tokens = batch_stats(trainer, steps * trainer.args.gradient_accumulation_steps, shared)
    torch.manual_seed(0)
    if patched:
        with score_labelled_positions_only():
            trainer.train()
    else:
        trainer.train()
    seconds = float(np.sum(np.array(timer.ends[1:]) - np.array(timer.starts[1:])))
    per_step = tokens / steps  # every row's tokens, the prefix counted once per row (as TRL counts)
    return {"tokens_per_s": per_step * (steps - 1) / seconds, "non_pad_share": real / total, "losses": timer.losses,
            "computed_share": total / tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per trainer (the first is warm-up)")
    parser.add_argument("--data", default="data/teacher", help="teacher step shards")
    parser.add_argument("--bf16-check", action="store_true", help="also compare loss curves with bf16 on and off")
    parser.add_argument("--accum", type=int, default=None, help="override sft.grad_accum (shorter steps)")
    parser.add_argument("--batch", type=int, default=None, help="override sft.batch_size")
    parser.add_argument("--model", default=None, help="model dir instead of model.dir (e.g. a tiny test model)")
    args = parser.parse_args()

    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from dynaplan.config import load_params
    from dynaplan.train.sft import (
        answer_lengths,
        load_base,
        loss_tokens_per_step,
        make_config,
        make_lora_config,
        sft_trainer_class,
        to_dataset,
        token_lengths,
        uses_shared_prefix,
    )
    from dynaplan.train.sft_data import (
        build_examples, env_batches, read_rows, sample_rows, sample_train_rows, split_by_episode,
    )

    params = load_params()
    overrides = {k: v for k, v in (("grad_accum", args.accum), ("batch_size", args.batch)) if v is not None}
    params = params.model_copy(update={"sft": params.sft.model_copy(update=overrides)})
    model_dir = Path(args.model or params.model.dir)
    sft = params.sft
    rows = read_rows(args.data, sft.envs)
    train_rows, _ = split_by_episode(rows, sft.eval_fraction, sft.seed)
    examples = build_examples(sample_rows(train_rows, sft.batch_size * sft.grad_accum * args.steps, sft.seed), "dynamic")
    dataset = to_dataset(examples)
    out = Path("/tmp/dynaplan-sft-bench")
    results = {}

    # Ours: the stage's SFTConfig, trainer (shared-prefix loss when params allow), data order and patch.
    model, tokenizer = load_base(model_dir)
    config = make_config(params, out / "ours", has_eval=False)
    config.max_steps, config.save_strategy, config.disable_tqdm, config.logging_steps = args.steps, "no", True, 1
    shared = uses_shared_prefix(params)
    ours_data = to_dataset(env_batches(examples, sft.batch_size, sft.seed, token_lengths(tokenizer, examples))) if shared else dataset
    ours = sft_trainer_class()(model=model, args=config, train_dataset=ours_data, processing_class=tokenizer,
                               peft_config=make_lora_config(params, model.config.num_hidden_layers), shared_prefix=shared,
                               loss_tokens_per_step=loss_tokens_per_step(params, answer_lengths(tokenizer, examples)))
    results["ours"] = run(ours, args.steps, patched=True, shared=shared)
    del ours, model

    # Plain: what the TRL docs show, same hyper-parameters, TRL's defaults otherwise.
    model, tokenizer = load_base(model_dir)
    plain_config = SFTConfig(
        output_dir=str(out / "plain"), max_steps=args.steps, per_device_train_batch_size=sft.batch_size,
        gradient_accumulation_steps=sft.grad_accum, learning_rate=sft.learning_rate, bf16=sft.bf16,
        gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        seed=sft.seed, data_seed=sft.seed, use_cpu=not torch.cuda.is_available(),
    )
    layers = model.config.num_hidden_layers
    lora = LoraConfig(r=sft.lora.r, lora_alpha=sft.lora.alpha, lora_dropout=sft.lora.dropout,
                      target_modules=list(sft.lora.target_modules), task_type="CAUSAL_LM",
                      layers_to_transform=list(range(layers - sft.lora.top_layers, layers)) if sft.lora.top_layers else None)
    plain = SFTTrainer(model=model, args=plain_config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    results["plain"] = run(plain, args.steps, patched=False)
    del plain, model

    print(f"model {model_dir}, {len(examples)} examples, batch {sft.batch_size} x accum {sft.grad_accum}, "
          f"{args.steps} steps (first dropped), bf16={sft.bf16}, shared prefix={shared}, torch threads {torch.get_num_threads()}")
    for name, r in results.items():
        print(f"  {name:6s} {r['tokens_per_s']:8.1f} tokens/s   non-padding share {r['non_pad_share']:.1%}   "
              f"positions computed per token {r['computed_share']:.2f}   losses {np.round(r['losses'], 3).tolist()}")
    ratio = results["ours"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    print(f"throughput ratio ours/plain: {ratio:.2f}x (target >= 0.95x); our non-padding share "
          f"{results['ours']['non_pad_share']:.1%} in the timed steps")
    if shared:
        # The timed steps are a few batches; the stage trains on its whole sample in this order.
        stage_rows = sample_train_rows(train_rows, sft.max_train_examples or len(train_rows), sft.seed, sft.plan_share)
        stage = build_examples(stage_rows, "dynamic")
        order = env_batches(stage, sft.batch_size, sft.seed, token_lengths(tokenizer, stage), window=sft.length_group_batches,
                            balance_plans=sft.balance_plan_batches, plan_tolerance=sft.plan_batch_tolerance)
        print(f"non-padding share over one epoch of the sft stage's batches ({len(stage)} examples, dynamic): "
              f"{epoch_padding(order, tokenizer, sft.batch_size):.1%} (target >= 90%)")

    if args.bf16_check:
        curves = {}
        for bf16 in (False, True):
            model, tokenizer = load_base(model_dir)
            config = make_config(params.model_copy(update={"sft": sft.model_copy(update={"bf16": bf16})}), out / f"bf16-{bf16}", has_eval=False)
            config.max_steps, config.save_strategy, config.disable_tqdm, config.logging_steps = args.steps, "no", True, 1
            trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=make_lora_config(params, model.config.num_hidden_layers))
            curves[bf16] = run(trainer, args.steps, patched=True)
        fp32, bf = np.array(curves[False]["losses"]), np.array(curves[True]["losses"])
        print(f"bf16 check: fp32 {curves[False]['tokens_per_s']:.1f} tokens/s, bf16 {curves[True]['tokens_per_s']:.1f} tokens/s "
              f"({curves[True]['tokens_per_s'] / curves[False]['tokens_per_s']:.2f}x); loss fp32 {np.round(fp32, 3).tolist()} "
              f"bf16 {np.round(bf, 3).tolist()}; max |diff| {np.abs(fp32 - bf).max():.3f}, "
              f"max relative {np.max(np.abs(fp32 - bf) / fp32):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
