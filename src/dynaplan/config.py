"""Typed, validated models of `params.yaml`: the only code that reads the params file.

One pydantic model per section, `extra="forbid"`, every field with a default, bounds and a
one-line description. `load_params()` turns any problem into a `ConfigError` whose message names
the file, the key, the value and what is allowed; entry points exit with code 2 on it.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"
EXIT_USAGE = 2


class ConfigError(ValueError):
    """A bad params file or value; the message says what and where. Exit code 2."""


def usage_errors_exit_2(*errors: type[Exception]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates an entry point's `main`: a ConfigError, or one of `errors`, raised anywhere in it
    prints `error: <message>` on stderr and returns EXIT_USAGE (2) instead of a traceback."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except (ConfigError, *errors) as err:
                print(f"error: {err}", file=sys.stderr)
                return EXIT_USAGE

        return run

    return decorate


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Section):
    base: str = Field("smollm2", description="'smollm2' (the embedded SmolLM2-135M-Instruct GGUF) or a local Hugging Face model directory")
    dir: str = Field("models/base", description="where the base_model stage writes the safetensors copy")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype when loading for inference")


class CrafterParams(Section):
    max_steps: int = Field(2000, ge=1, description="episode cap in steps (BALROG: 2000)")
    area: int = Field(64, ge=16, description="world size in tiles (square)")
    edge_only: list[str] = Field(default_factory=lambda: ["water", "lava"], description="materials listed only by their edge tiles")


class PogsParams(Section):
    num_nodes: int = Field(20, ge=2, description="nodes in the random labelled tree")
    k: int = Field(2, ge=1, description="visibility radius in hops")
    max_steps: int = Field(30, ge=1, description="episode cap in steps")
    hard: bool = Field(True, description="keep only graphs where the symbolic explorer backtracks")
    min_backtracks: int = Field(1, ge=0, description="backtracks the symbolic explorer must need in hard mode")


class EnvsParams(Section):
    crafter: CrafterParams = CrafterParams()
    pogs: PogsParams = PogsParams()


class PromptParams(Section):
    history_len: int = Field(2, ge=0, description="past observations and actions kept in the prompt (paper scale: 16)")
    max_prompt_tokens: int = Field(768, ge=64, description="token budget of the prompt; the oldest history goes first")
    max_new_tokens: int = Field(96, ge=1, description="cap on the tokens of one answer (plan plus action)")


class SeedsParams(Section):
    train_start: int = Field(0, ge=0, description="first env seed used for teacher data and training")
    eval_start: int = Field(1_000_000, ge=0, description="first held-out env seed used for evaluation and promotion")


class GenerateParams(Section):
    seed: int = Field(0, description="seed of the plan-interval and teacher generators")
    crafter_episodes: int = Field(8, ge=0, description="Crafter expert episodes")
    crafter_max_steps: int = Field(200, ge=1, description="Crafter steps per teacher episode")
    pogs_episodes: int = Field(40, ge=0, description="POGS expert episodes")
    plan_interval_min: int = Field(2, ge=1, description="smallest gap between two teacher plans")
    plan_interval_max: int = Field(12, ge=1, description="largest gap between two teacher plans")
    episodes_per_shard: int = Field(4, ge=1, description="episodes per Parquet shard")
    workers: int = Field(2, ge=1, description="processes that generate shards in parallel")
    crafter_plan_styles: list[str] = Field(
        default_factory=lambda: ["short_term_long_term", "goal_reason", "checklist", "strategy"],
        description="the wordings the Crafter teacher draws its plans from (names in "
        "dynaplan.teachers.crafter_plans.PLAN_STYLE_NAMES); empty: all of them",
    )

    @field_validator("crafter_plan_styles")
    @classmethod
    def _known_styles(cls, names: list[str]) -> list[str]:
        from dynaplan.teachers.crafter_plans import style_indices

        style_indices(names)  # raises ValueError naming the unknown or repeated style
        return names

    @model_validator(mode="after")
    def _interval_order(self) -> "GenerateParams":
        if self.plan_interval_min > self.plan_interval_max:
            raise ValueError(
                f"plan_interval_min={self.plan_interval_min} must be <= plan_interval_max={self.plan_interval_max}"
            )
        return self


class ValidateParams(Section):
    plan_min_chars: int = Field(8, ge=1, description="shortest allowed plan text")
    plan_max_chars: int = Field(600, ge=1, le=2000, description="longest allowed plan text")
    max_seq_len: int = Field(2048, ge=64, description="prompt plus target (chat template applied) must fit in this many tokens; keep sft.max_seq_len >= this (Crafter cave views reach ~1400)")


class EvaluateParams(Section):
    seed: int = Field(0, description="policy seed of attempt 0 (sampling, teacher plan intervals, random actions); later best-of-N attempts derive theirs from it")
    env: Literal["crafter", "pogs"] = Field("crafter", description="env of the LLM evaluations (Goldilocks sweep, best-of-N); baselines run both")
    episodes: int = Field(1, ge=1, le=100_000, description="held-out seeds per LLM evaluation (seeds.eval_start ..); paper scale: 100")
    baseline_episodes: int = Field(20, ge=1, le=100_000, description="held-out seeds for the scripted expert and random baselines (cheap, full-length episodes)")
    num_envs: int = Field(16, ge=1, le=4096, description="envs stepped in lockstep, one batched generation per step")
    crafter_max_steps: int = Field(8, ge=1, description="cap on Crafter steps for LLM policies (CPU budget; paper scale: envs.crafter.max_steps)")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="sampling temperature of LLM policies (0 = greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling of LLM policies")
    max_new_tokens: int = Field(24, ge=1, le=8192, description="cap on the tokens of one answer during evaluation (CPU budget; paper scale: 512)")
    backend: Literal["hf", "openai", "vllm"] = Field("hf", description="model backend for LLM policies")
    mode: Literal["dynamic", "every_k", "never", "always"] = Field("dynamic", description="planning mode of a plain `dynaplan evaluate --policy model`")
    k: int = Field(4, ge=1, description="planning interval of every_k")
    intervals: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1, description="fixed planning intervals of the Goldilocks sweep (plus never and dynamic)")
    best_of: int = Field(2, ge=1, le=1000, description="attempts per seed in the best-of-N evaluations")
    best_of_episodes: int = Field(1, ge=1, le=100_000, description="held-out seeds of the best-of-N evaluations (each played best_of times)")
    sft_episodes: int = Field(16, ge=1, le=100_000, description="held-out seeds of the SFT students' evaluations (evaluate_sft@<variant>)")
    sft_max_steps: int = Field(24, ge=1, description="cap on steps per episode of the SFT students' evaluations and of the capped random baseline they are compared with")
    sft_max_new_tokens: int = Field(128, ge=1, le=8192, description="cap on answer tokens in the SFT students' evaluations (room for a teacher-length plan: ~60 tokens)")
    plans_file: str = Field("plans/crafter_human.yaml", min_length=1, description="human plans (YAML list of {plan, until}) for the steered best-of-N evaluation")

    @model_validator(mode="after")
    def _intervals_positive(self) -> "EvaluateParams":
        bad = [k for k in self.intervals if k < 1]
        if bad:
            raise ValueError(f"intervals must all be >= 1, got {bad}")
        return self


class PromoteParams(Section):
    model_name: str = Field("dynaplan-agent", min_length=1, description="registered model whose `challenger` may replace its `champion`")
    env: Literal["crafter", "pogs"] = Field("pogs", description="env of the held-out comparison")
    episodes: int = Field(10, ge=2, le=10_000, description="held-out seeds seeds.eval_start .. +episodes-1, the same for both versions")
    margin_se: float = Field(1.0, ge=0.0, description="promote only if mean progression gain > margin_se x paired standard error")
    max_tokens_per_episode: float = Field(20_000, gt=0, description="budget of generated tokens (plans + actions) per episode for the candidate")
    evaluate_missing: bool = Field(True, description="evaluate a version that has no stored held-out evaluation (else refuse)")


class PpoParams(Section):
    env: Literal["pogs", "crafter"] = Field("pogs", description="env PPO trains in (the paper: crafter); its settings come from envs.<env>")
    iterations: int = Field(2, ge=1, description="rollout + update cycles (paper scale: hundreds)")
    num_envs: int = Field(2, ge=1, description="envs stepped in lockstep, one batched generation per step (paper scale: 16+)")
    episodes_per_iteration: int = Field(2, ge=1, description="whole episodes rolled out per iteration (fresh env seeds each time)")
    max_steps: int = Field(4, ge=1, description="cap on turns per episode (paper scale: Crafter's 2000)")
    plan_cost: float = Field(0.002, ge=0.0, description="reward charged per plan token (after reward_scale); the App. C.3 sweep key")
    plan_penalty: float = Field(0.0, ge=0.0, description="extra reward charged per plan written, whatever its length")
    reward_scale: float = Field(0.01, gt=0.0, description="env reward multiplier (POGS pays 100 at the target; crafter: 1.0)")
    gamma: float = Field(0.99, ge=0.0, le=1.0, description="discount per turn")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda over turns")
    clip_coef: float = Field(0.2, gt=0.0, description="PPO ratio clip range (also clips the value update)")
    vf_coef: float = Field(0.5, ge=0.0, description="weight of the value loss")
    ent_coef: float = Field(0.001, ge=0.0, description="weight of the entropy bonus (mean over generated tokens)")
    kl_coef: float = Field(0.05, ge=0.0, description="weight of the KL penalty to the reference policy (SFT adapter or base)")
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate of the LoRA weights")
    value_learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the value head")
    update_epochs: int = Field(1, ge=1, description="passes over an iteration's turns (paper scale: 2-4)")
    minibatch_size: int = Field(4, ge=1, description="turns per gradient step")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping (global norm over LoRA + value head)")
    norm_adv: bool = Field(True, description="normalise advantages per minibatch")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of rollouts; training log-probs use the same")
    lora_r: int = Field(16, ge=1, le=1024, description="rank of the fresh LoRA of the `base` ablation (SFT ablations keep the SFT adapter's)")
    lora_alpha: int = Field(32, ge=1, description="alpha of the fresh LoRA (`base` ablation)")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="modules that get the fresh LoRA (`base` ablation)",
    )
    checkpoint_every: int = Field(1, ge=1, description="iterations between checkpoints (also registered as dynaplan-agent versions)")
    seed: int = Field(0, description="seed of sampling, minibatch order and the fresh LoRA; env seeds start at seeds.train_start")
    rollout_backend: Literal["hf", "vllm", "openai"] = Field(
        "hf", description="hf: generate with the training model itself (CPU); vllm: in-process with the current LoRA; openai: a `vllm serve --enable-lora` server"
    )
    server_url: str = Field("http://127.0.0.1:8000/v1", description="base URL of the vllm server (rollout_backend=openai)")


class LoraParams(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="module names that get a LoRA adapter (not lm_head: TRL computes the loss from its weight)",
    )
    top_layers: int = Field(0, ge=0, description="adapt only the last N transformer layers (0 = all): the backward pass stops below them, so CPU steps are much cheaper")


class SftParams(Section):
    envs: list[Literal["crafter", "pogs"]] = Field(
        default_factory=lambda: ["crafter", "pogs"], min_length=1, description="which envs' teacher steps to train on"
    )
    max_train_examples: int = Field(384, ge=0, description="cap on training examples: a seeded sample of the training episodes' steps; 0 = all")
    format_loss_weight: float = Field(
        10.0, ge=0.0,
        description="weight of an extra loss term per training answer: -log P(first answer token can begin a valid answer), the probability the student puts on the tokens the strict protocol lets an answer start with (an action's first piece, '<' of '<plan>'). It pushes down only the mass on tokens that make the answer invalid, not the choice between valid ones; 1 weighs it like one answer token. 0 = off. Needs the shared-prefix loss",
    )
    format_loss_scope: Literal["first_token", "outside_plan", "plan_breaks"] = Field(
        "plan_breaks",
        description="where the format loss scores (nowhere when format_loss_weight is 0): first_token = the answer's first token; outside_plan = also every later answer token outside the plan's text (the rest of the `<plan>` tag, the closing tag, the action after it, the untagged action, the end-of-turn), each -log P(a token that keeps the answer a valid prefix), summed per answer; plan_breaks = outside_plan and, inside the plan's text, only its break points (right after a newline or a full stop: where the student was measured to end the turn with the plan still open). Scoring every plan-text token taught the student not to end its plans",
    )
    format_loss_continuation_weight: float | None = Field(
        30.0, ge=0.0,
        description="weight of the format loss at the positions after the first answer token (format_loss_scope outside_plan or plan_breaks; unused with first_token or format_loss_weight 0); null = format_loss_weight. The first token's weight also moves the plan decision (its gradient favours the likely acting tokens over '<'), the later positions' does not: measured, first token 10 with the later positions at 30 kept the student planning where 30 for both did not",
    )
    plan_share: float = Field(
        0.25, ge=0.0, lt=1.0,
        description="share of each env's sampled training steps that are steps where the teacher planned (a seeded stratified sample); 0 = a plain seeded sample at the teacher's own rate. The dynamic student sees more plans to learn to write them, while the loss on an answer's first token (open a plan or act) is importance-weighted back to the teacher's per-env rate, so P(open a plan) still aims at it. Needs the shared-prefix loss",
    )
    balance_plan_batches: bool = Field(
        True,
        description="dynamic variant, shared-prefix batches: spread each env's plan steps evenly over its batches (every batch holds the env's share of them, +- plan_batch_tolerance) instead of as the shuffle and the length grouping drop them (0 to 5 of 8 per batch). The plan decision then gets the same pull in every step. Measured (README, SFT probe (m)): held-out loss 0.745 against 1.019 without; P(open a plan) on held-out prompts still moves between 0.3% and 30% from one 8-step checkpoint to the next (up to 50% without) and ended at 17.5%, the loss's fixed point being 16%",
    )
    plan_batch_tolerance: int = Field(
        1, ge=0,
        description="with balance_plan_batches: a batch may hold this many plan steps more or fewer than its env's share (rounded), so the length sort places more rows by length (less padding). Measured on the default data (README, SFT benchmark): non-padding share 91.4% at 1, 87.8% at 0 (92.0% unbalanced); trained at 1 (probe (p)): evaluate_sft 99.5% valid, plans on 10.7% of steps",
    )
    length_group_batches: int = Field(
        8, ge=1,
        description="shared-prefix batches: each env's shuffled steps are sorted by length in runs of this many batches before they are cut into batches (less padding; transformers' LengthGroupedSampler does the same in runs of a quarter of the data, at most 50 batches). With balance_plan_batches, a class's share of such a run. Measured on the default data (README, SFT benchmark): non-padding share 92.0% at 8, 98.0% over the whole env; balanced with plan_batch_tolerance 1: 91.4% at 8 (exactly balanced: 87.8%)",
    )
    eval_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="share of episodes (per env) held out")
    eval_examples: int = Field(24, ge=1, description="held-out steps used for greedy answers and KL (seeded sample)")
    lora: LoraParams = LoraParams()
    learning_rate: float = Field(2e-3, gt=0.0, le=1.0, description="peak AdamW learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup", "warmup_stable_decay"] = Field(
        "constant_with_warmup",
        description="schedule after warm-up; warmup_stable_decay: constant, then a linear decay to 0 over the last lr_decay_ratio of the steps (transformers' WSD)",
    )
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="share of optimizer steps spent warming up")
    lr_decay_ratio: float = Field(
        0.25, gt=0.0, le=1.0,
        description="lr_scheduler warmup_stable_decay: share of the optimizer steps in the final linear decay to 0. Measured (README, SFT probe (l)): at the constant default rate the student's P(open a plan) on held-out prompts swings between 0.1% and 50% from one 8-step checkpoint to the next; a decay over the last quarter stopped it at 2.1%",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    epochs: float = Field(1.0, gt=0.0, description="passes over the training examples (ignored when max_steps > 0)")
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 = derive from epochs")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass (per device); with shared_prefix one env's steps, whose common system prompt runs once")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    max_seq_len: int = Field(2048, ge=32, description="longest prompt + completion in tokens; a longer example is an error, never truncated")
    shared_prefix: bool = Field(True, description="batches hold one env's steps and their common system prompt runs once per batch (exact; dynaplan.train.prefix). Needs batch_size > 1, one process and no gradient checkpointing, else TRL's own loss runs")
    loss_normalization: Literal["dataset", "batch"] = Field("dataset", description="what a step's summed answer-token loss is divided by: dataset = the dataset's mean answer tokens per step (every token weighs the same; unbiased plan decision), batch = the step's own count (TRL's default; under-weights the steps with plans)")
    padding_free: bool = Field(False, description="flatten each batch into one sequence (exact: block-diagonal attention from position ids; with SDPA the mask spans the whole batch, so use it with flash_attention_2)")
    bf16: bool = Field(False, description="bfloat16 autocast; weights and optimizer state stay float32. On for GPUs and CPUs with native bf16 (AVX512-BF16/AMX); on AVX2-only CPUs it is emulated and measured 7x slower")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (GPU memory); slower")
    model_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the frozen base weights while training (bfloat16 on GPUs); LoRA weights stay float32")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="attention kernel; padding-free batches are exact with each (sdpa builds a block-diagonal mask), flash_attention_2 is the memory-lean one on GPUs")
    seed: int = Field(0, description="seed of the split, the LoRA init and the data order")
    save_steps: int = Field(8, ge=1, description="checkpoint every this many optimizer steps (resume point)")
    save_total_limit: int = Field(3, ge=1, description="checkpoints kept on disk")
    average_checkpoints: int = Field(
        3, ge=1,
        description="the final adapter is the exact mean of the LoRA weight deltas of the last N checkpoints (the last "
        "step's included; one adapter of rank N x lora.r, PEFT's add_weighted_adapter 'cat'); 1 = the last step's "
        "weights. Needs sft.save_total_limit >= N",
    )
    logging_steps: int = Field(1, ge=1, description="log train loss to MLflow every this many optimizer steps")
    eval_steps: int = Field(0, ge=0, description="held-out loss every this many steps; 0 = only at the end")
    register_checkpoints: bool = Field(True, description="register every saved checkpoint as a dynaplan-agent version, not just the final adapter")
    eval_max_new_tokens: int = Field(128, ge=1, description="cap on greedy answer tokens in the held-out metrics")
    eval_batch_size: int = Field(8, ge=1, description="prompts per batch for greedy answers and KL")
    eval_samples: int = Field(2, ge=0, description="answers sampled per held-out prompt at evaluate.temperature/top_p for the sampled format validity and plan rate; 0 = greedy only")

    @property
    def shared_prefix_possible(self) -> bool:
        """These settings let the shared-prefix loss run: asked for, 2+ rows per batch, no
        gradient checkpointing (which turns the cache off). One process is checked at run time."""
        return self.shared_prefix and self.batch_size > 1 and not self.gradient_checkpointing

    @model_validator(mode="after")
    def _first_token_losses_need_shared_prefix(self) -> "SftParams":
        for key, value, does in (
            ("plan_share", self.plan_share, "weights each answer's first token"),
            ("format_loss_weight", self.format_loss_weight, "scores each answer's first token"),
        ):
            if value > 0 and not self.shared_prefix_possible:
                raise ValueError(
                    f"sft.{key}={value} {does}, which only the shared-prefix "
                    f"loss does: it needs sft.shared_prefix true (is {self.shared_prefix}), sft.batch_size > 1 "
                    f"(is {self.batch_size}) and sft.gradient_checkpointing false (is {self.gradient_checkpointing}); "
                    f"or set sft.{key}: 0"
                )
        if self.average_checkpoints > self.save_total_limit:
            raise ValueError(
                f"sft.average_checkpoints={self.average_checkpoints} averages the last checkpoints, but sft.save_total_limit="
                f"{self.save_total_limit} keeps fewer on disk: raise sft.save_total_limit to at least {self.average_checkpoints}"
            )
        if self.lr_scheduler == "warmup_stable_decay" and self.warmup_ratio + self.lr_decay_ratio > 1.0:
            raise ValueError(
                f"sft.warmup_ratio={self.warmup_ratio} + sft.lr_decay_ratio={self.lr_decay_ratio} exceed the run's steps "
                "(sft.lr_scheduler: warmup_stable_decay warms up, then decays): their sum must be at most 1"
            )
        return self


class Params(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    model: ModelParams = ModelParams()
    envs: EnvsParams = EnvsParams()
    prompt: PromptParams = PromptParams()
    seeds: SeedsParams = SeedsParams()
    generate: GenerateParams = GenerateParams()
    # `validate` would shadow pydantic's BaseModel.validate: the attribute is `validation`.
    validation: ValidateParams = Field(ValidateParams(), alias="validate")
    sft: SftParams = SftParams()
    promote: PromoteParams = PromoteParams()
    evaluate: EvaluateParams = EvaluateParams()
    ppo: PpoParams = PpoParams()

    def train_seed_range(self) -> range:
        """Every env seed a training stage plays: teacher episodes and PPO rollouts."""
        count = max(
            self.generate.crafter_episodes, self.generate.pogs_episodes,
            self.ppo.iterations * self.ppo.episodes_per_iteration,
        )
        return range(self.seeds.train_start, self.seeds.train_start + count)

    def eval_seed_range(self) -> range:
        """Every held-out env seed evaluation and promotion play."""
        count = max(
            self.evaluate.episodes, self.evaluate.baseline_episodes, self.evaluate.best_of_episodes,
            self.evaluate.sft_episodes,
            self.promote.episodes,
        )
        return range(self.seeds.eval_start, self.seeds.eval_start + count)

    @model_validator(mode="after")
    def _seeds_disjoint(self) -> "Params":
        train, held_out = self.train_seed_range(), self.eval_seed_range()
        if train and held_out and train.start < held_out.stop and held_out.start < train.stop:
            raise ValueError(
                f"seeds.eval_start={self.seeds.eval_start}: the evaluation seeds [{held_out.start}, {held_out.stop}) "
                f"overlap the training seeds [{train.start}, {train.stop}) (seeds.train_start={self.seeds.train_start}); "
                f"move seeds.eval_start to >= {train.stop} or seeds.train_start to >= {held_out.stop}"
            )
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid params in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo?); remove it or use one of the documented keys")
            continue
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_params(path: str | os.PathLike[str] = PARAMS_FILE) -> Params:
    """Read and validate a params file; raises ConfigError (exit code 2) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, str(path))
