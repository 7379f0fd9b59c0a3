"""PPO throughput, measured side by side in one run on one model (the embedded SmolLM2 by default):

1. rollout turns/s with 16 lockstep envs vs 1 (one batched generation per step vs one per env);
2. PPO update tokens/s (forward + backward of prompt + answer, the scoring pass timed apart)
   vs TRL SFT training tokens/s on the very same turns as prompt-completion examples, with the
   turns' shared prompt prefix computed once per minibatch (as the trainer does) and without;
3. the share of an iteration's wall time spent in rollouts.

Usage: python benchmarks/ppo_throughput.py [--model models/base] [--envs 16] [--sft-steps 6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def resolve_model(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from dynaplan.models.materialize import SMOLLM2, default_cache_dir, materialize_base

    cached = default_cache_dir() / "bench-smollm2"
    materialize_base(SMOLLM2, cached)
    return cached


def rollout(params, model, tokenizer, num_envs: int, episodes: int, seed: int):
    from dynaplan.agent.policy import LLMPolicy
    from dynaplan.envs import make_env
    from dynaplan.models.base import SamplingParams
    from dynaplan.train.ppo import SharedHFRollouts, collect_turns
    from dynaplan.train.rollout import run_episodes

    args = params.ppo
    env_kwargs = params.envs.model_dump()[args.env]
    env = make_env(args.env, **env_kwargs)
    policy = LLMPolicy(
        SharedHFRollouts(model, tokenizer), action_names=env.action_names,
        default_action=lambda info: str(info["current_node"]), rules=env.rules, mode="dynamic",
        history_len=params.prompt.history_len, max_prompt_tokens=params.prompt.max_prompt_tokens,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=params.prompt.max_new_tokens), seed=seed,
    )
    started = time.perf_counter()
    with torch.no_grad():
        episodes_out = run_episodes(policy, args.env, env_kwargs, list(range(episodes)), num_envs=num_envs,
                                    max_steps=args.max_steps, progress=False)
    elapsed = time.perf_counter() - started
    turns = collect_turns(episodes_out)
    messages = [s.decision.messages for e in episodes_out for s in e.steps]
    texts = [s.decision.text for e in episodes_out for s in e.steps]
    return turns, messages, texts, elapsed


def sft_tokens_per_second(params, model_dir: Path, messages, texts, steps: int, bf16: bool) -> float:
    """TRL SFTTrainer as the sft stage configures it (train/sft.py), on the rollout's turns."""
    from datasets import Dataset
    from trl import SFTTrainer

    from dynaplan.config import parse_params
    from dynaplan.train.sft import load_base, make_config, make_lora_config, score_labelled_positions_only

    raw = params.model_dump(mode="json", by_alias=True)
    raw["sft"].update({"max_steps": steps, "save_steps": 10_000, "bf16": bf16, "batch_size": params.ppo.minibatch_size,
                       "grad_accum": 1, "warmup_ratio": 0.0, "logging_steps": 1000})
    sft_params = parse_params(raw)
    model, tokenizer = load_base(model_dir)
    records = [{"prompt": m, "completion": [{"role": "assistant", "content": t}]} for m, t in zip(messages, texts)]
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=model, args=make_config(sft_params, Path(out), has_eval=False), train_dataset=Dataset.from_list(records),
            processing_class=tokenizer, peft_config=make_lora_config(sft_params),
        )
        started = time.perf_counter()
        with score_labelled_positions_only():
            trainer.train()
        elapsed = time.perf_counter() - started
        return float(trainer._total_train_tokens) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--single-episodes", type=int, default=2, help="episodes for the 1-env rollout")
    parser.add_argument("--sft-steps", type=int, default=2, help="SFT optimizer steps of ppo.minibatch_size turns")
    parser.add_argument("--train-turns", type=int, default=8, help="turns the PPO update and SFT both train on")
    parser.add_argument("--bf16", action="store_true", help="also time SFT with bf16 autocast (SFT's default)")
    parser.add_argument("--max-steps", type=int, default=1, help="turns per episode")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    from dynaplan.config import load_params, parse_params
    from dynaplan.train import prefix
    from dynaplan.train.ppo import ABLATIONS, Turns, ValueHead, load_policy_model, update

    model_dir = resolve_model(args.model)
    raw = load_params().model_dump(mode="json", by_alias=True)
    raw["ppo"].update({"max_steps": args.max_steps, "kl_coef": 0.05, "update_epochs": 1})
    raw["prompt"]["max_new_tokens"] = args.max_new_tokens
    params = parse_params(raw)
    console = Console()
    console.print(f"model {model_dir}, torch threads {torch.get_num_threads()}, env {params.ppo.env} "
                  f"(max_steps {params.ppo.max_steps}), max_new_tokens {params.prompt.max_new_tokens}")

    model, tokenizer = load_policy_model(model_dir, ABLATIONS["base"], None, params.ppo)
    turns_many, messages, texts, t_many = rollout(params, model, tokenizer, args.envs, args.envs, seed=1)
    turns_one, _, _, t_one = rollout(params, model, tokenizer, 1, args.single_episodes, seed=1)

    value_head = ValueHead(model.get_base_model().config.hidden_size)
    optimizer = torch.optim.Adam(
        [{"params": [p for p in model.parameters() if p.requires_grad]}, {"params": list(value_head.parameters())}],
        lr=params.ppo.learning_rate, eps=1e-5,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Update and SFT train on the same first `--train-turns` turns (the CPU budget).
    keep = slice(0, args.train_turns)
    train_turns = Turns(**{name: getattr(turns_many, name)[keep] for name in Turns.__dataclass_fields__})
    train_turns.dones = [True] * len(train_turns)  # each kept turn closes its (one-step) episode
    messages, texts = messages[keep], texts[keep]
    # The same update with each row's full prompt (the shared prefix switched off) and as the
    # trainer runs it (the turns' common system-prompt prefix computed once per minibatch),
    # interleaved twice so that warm-up and load drift fall on both alike; times are summed.
    saved_min = prefix.MIN_SHARED_PREFIX
    totals = {False: [0.0, 0.0, 0], True: [0.0, 0.0, 0]}  # update_s, score_s, tokens
    for iteration, shared in enumerate((False, True, False, True)):
        prefix.MIN_SHARED_PREFIX = saved_min if shared else 10**9
        try:
            run = update(model, value_head, optimizer, train_turns, params.ppo, ABLATIONS["base"], pad_id=pad_id, iteration=iteration)
        finally:
            prefix.MIN_SHARED_PREFIX = saved_min
        for i, key in enumerate(("perf/update_s", "perf/score_s", "perf/update_tokens")):
            totals[shared][i] += run[key]
    stats = {"perf/update_s": totals[True][0], "perf/score_s": totals[True][1], "perf/update_tokens": totals[True][2]}
    ppo_tps = totals[True][2] / totals[True][0]
    ppo_tps_with_scoring = totals[True][2] / (totals[True][0] + totals[True][1])
    full_tps = totals[False][2] / totals[False][0]
    full_tps_with_scoring = totals[False][2] / (totals[False][0] + totals[False][1])
    sft_fp32 = sft_tokens_per_second(params, model_dir, messages, texts, args.sft_steps, bf16=False)
    sft_bf16 = sft_tokens_per_second(params, model_dir, messages, texts, args.sft_steps, bf16=True) if args.bf16 else None

    many_tps, one_tps = len(turns_many) / t_many, len(turns_one) / t_one
    # An iteration's wall time: its rollout plus scoring and updating all of its turns.
    per_turn = (stats["perf/score_s"] + stats["perf/update_s"]) / (2 * len(train_turns))  # two shared updates
    wall = t_many + per_turn * len(turns_many)
    table = Table(title="PPO throughput (one run, same model)")
    for column in ("measure", "value", "ratio"):
        table.add_column(column)
    table.add_row(f"rollout turns/s, {args.envs} envs", f"{many_tps:.2f} ({len(turns_many)} turns)", f"{many_tps / one_tps:.2f}x vs 1 env")
    table.add_row("rollout turns/s, 1 env", f"{one_tps:.2f} ({len(turns_one)} turns)", "1.00x")
    table.add_row("PPO update tokens/s (fp32, grad pass)", f"{ppo_tps:.0f}", f"{ppo_tps / sft_fp32:.2f}x vs SFT fp32")
    table.add_row("PPO update tokens/s incl. scoring pass", f"{ppo_tps_with_scoring:.0f}", f"{ppo_tps_with_scoring / sft_fp32:.2f}x vs SFT fp32")
    table.add_row("  same, prefix not shared (grad pass)", f"{full_tps:.0f}", f"{full_tps / sft_fp32:.2f}x vs SFT fp32; shared/not {ppo_tps / full_tps:.2f}x")
    table.add_row("  same, prefix not shared, incl. scoring", f"{full_tps_with_scoring:.0f}",
                  f"{full_tps_with_scoring / sft_fp32:.2f}x vs SFT fp32; shared/not {ppo_tps_with_scoring / full_tps_with_scoring:.2f}x")
    table.add_row("SFT (TRL) train tokens/s, fp32", f"{sft_fp32:.0f}", "1.00x")
    if sft_bf16:
        table.add_row("SFT (TRL) train tokens/s, bf16 autocast", f"{sft_bf16:.0f}", f"{ppo_tps / sft_bf16:.2f}x PPO/SFT-bf16")
    table.add_row("share of iteration wall time in rollout", f"{t_many / wall:.0%}", f"rollout {t_many:.1f}s, score+update {per_turn * len(turns_many):.1f}s (from {len(train_turns)} turns)")
    console.print(table)
    console.print(f"load: {os.getloadavg()[0]:.1f} (2-core machine shared with other jobs: numbers are noisy)")


if __name__ == "__main__":
    main()
