"""Multi-turn PPO with a planning-token cost (DESIGN.md section 6), read top to bottom like cleanRL.

One decision per turn; reward `scale * r_t - plan_cost * plan_tokens_t - plan_penalty * planned_t`;
a linear value head on the policy's last hidden state at the end of the prompt; GAE over each
episode's turns; the clipped objective over the turn's generated tokens; a KL penalty to the
reference policy by switching LoRA adapters on the same model. It must not build prompts or step
envs (agent/policy.py and train/rollout.py do) and talks to MLflow only through `tracking`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynaplan.config import ConfigError, Params, PpoParams
from dynaplan.train.prefix import shared_prefix_forward

# Token aggregation (documented choice): every generated token of a turn gets the turn's
# advantage and its own clipped ratio; the per-token losses are averaged within the turn, then
# over the turns of a minibatch. So each decision weighs the same whatever its length, and a long
# plan cannot swamp the gradient (the plan cost, not the loss normalisation, is what makes plans
# expensive). A whole-turn ratio exp(sum of token log-ratios) would explode for 50-token plans.


@dataclass(frozen=True)
class Ablation:
    start: str  # "sft": from the SFT adapter, reference = that adapter; "base": fresh LoRA, reference = base
    mode: str  # planning mode of the policy during rollouts
    sft_variant: str | None = None  # which SFT adapter (models/sft-<variant>/adapter) it starts from


ABLATIONS: dict[str, Ablation] = {
    "sft_dynamic": Ablation("sft", "dynamic", "dynamic"),  # SFT+RL, the agent decides when to plan
    # SFT+RL never-plan: primed on the plan-stripped teacher data, "<plan>" forbidden in rollouts.
    "sft_never": Ablation("sft", "never", "naive"),
    "base": Ablation("base", "dynamic"),  # RL without SFT priming
}
POLICY = "default"  # the trained adapter (PEFT saves "default" at the folder's root)
REFERENCE = "reference"  # the frozen SFT adapter, loaded a second time under this name


class PpoDivergence(RuntimeError):
    """A non-finite loss: the run stops and the last good checkpoint stays the resume point."""


# --------------------------------------------------------------------------- pure functions


def turn_rewards(env_rewards, plan_tokens, planned, *, reward_scale: float, plan_cost: float, plan_penalty: float) -> np.ndarray:
    """The per-turn reward PPO optimises: task reward minus the price of the plan written."""
    env_rewards = np.asarray(env_rewards, dtype=np.float64)
    plan_tokens = np.asarray(plan_tokens, dtype=np.float64)
    planned = np.asarray(planned, dtype=np.float64)
    return reward_scale * env_rewards - plan_cost * plan_tokens - plan_penalty * planned


def compute_gae(rewards, values, dones, *, gamma: float, gae_lambda: float) -> tuple[np.ndarray, np.ndarray]:
    """GAE over a flat sequence of turns from whole episodes; `dones[t]` marks an episode's last turn.

    Episodes cut at `max_steps` count as ended (value 0 after the cut): the next prompt is never
    built, and for Crafter at paper scale the cap is the game's own end.
    """
    rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
    dones = np.asarray(dones, dtype=bool)
    if not (len(rewards) == len(values) == len(dones)):
        raise ValueError(f"rewards, values and dones differ in length: {len(rewards)}, {len(values)}, {len(dones)}")
    if len(dones) and not dones[-1]:
        raise ValueError("the last turn must end its episode (dones[-1] is False): rollouts hold whole episodes")
    advantages = np.zeros_like(rewards)
    lastgaelam = 0.0
    for t in reversed(range(len(rewards))):
        nextnonterminal = 0.0 if dones[t] else 1.0
        nextvalue = values[t + 1] if not dones[t] else 0.0
        delta = rewards[t] + gamma * nextvalue * nextnonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


def masked_turn_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each turn's generated tokens, then over turns ([B, T] -> scalar)."""
    per_turn = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_turn.mean()


def policy_loss(newlogprob, oldlogprob, advantages, mask, clip_coef: float):
    """Clipped PPO surrogate over tokens; returns (pg_loss, clipfrac, approx_kl, ratio)."""
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    adv = advantages.unsqueeze(-1)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = masked_turn_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        approx_kl = masked_turn_mean((ratio - 1) - logratio, mask)
        clipfrac = masked_turn_mean(((ratio - 1.0).abs() > clip_coef).float(), mask)
    return pg_loss, clipfrac, approx_kl, ratio


def value_loss(newvalue, oldvalue, returns, clip_coef: float) -> torch.Tensor:
    """cleanRL's clipped value loss."""
    v_loss_unclipped = (newvalue - returns) ** 2
    v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -clip_coef, clip_coef)
    v_loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()


def kl_to_reference(newlogprob, reflogprob, mask) -> torch.Tensor:
    """KL(policy || reference) per token with the k3 estimator (unbiased, >= 0, exactly 0 when equal)."""
    log_ratio = reflogprob - newlogprob
    return masked_turn_mean(log_ratio.exp() - log_ratio - 1, mask)


def explained_variance(values, returns) -> float:
    values, returns = np.asarray(values, np.float64), np.asarray(returns, np.float64)
    var_y = np.var(returns)
    return float("nan") if var_y == 0 else float(1 - np.var(returns - values) / var_y)


# --------------------------------------------------------------------------- rollout storage


@dataclass
class Turns:
    """One row per turn of the iteration's episodes, in episode order (what the update trains on)."""

    prompt_token_ids: list[list[int]] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    env_rewards: list[float] = field(default_factory=list)
    plan_tokens: list[int] = field(default_factory=list)
    planned: list[bool] = field(default_factory=list)
    dones: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)


def collect_turns(episodes) -> Turns:
    """Flatten `run_episodes` results into turns, keeping the exact tokens the backend sampled."""
    turns = Turns()
    for episode in episodes:
        for i, step in enumerate(episode.steps):
            generation = step.decision.generation
            if generation is None:
                raise ValueError("PPO needs an LLM policy: a decision came without its generation")
            if len(generation.token_ids) != len(generation.logprobs):
                raise ValueError("backend returned token ids and log-probs of different lengths")
            turns.prompt_token_ids.append(list(generation.prompt_token_ids))
            turns.token_ids.append(list(generation.token_ids))
            turns.logprobs.append([float(x) for x in generation.logprobs])
            turns.env_rewards.append(step.reward)
            turns.plan_tokens.append(int(step.decision.plan_tokens))
            turns.planned.append(step.decision.plan_tokens > 0)
            turns.dones.append(i == len(episode.steps) - 1)
    return turns


def episode_stats(episodes) -> dict[str, float]:
    """Means over the iteration's episodes of what the paper reports (reward, progression, plans)."""
    def mean(xs):
        return float(np.mean(xs)) if len(xs) else 0.0

    turns = [s for e in episodes for s in e.steps]
    return {
        "episode/return": mean([e.total_reward for e in episodes]),
        "episode/progression": mean([float(e.final_info.get("progression", 0.0)) for e in episodes]),
        "episode/achievements": mean([len(e.final_info.get("achievements", {})) for e in episodes]),
        "episode/length": mean([e.length for e in episodes]),
        "episode/plan_tokens": mean([sum(s.decision.plan_tokens for s in e.steps) for e in episodes]),
        "episode/generated_tokens": mean([sum(s.decision.new_tokens for s in e.steps) for e in episodes]),
        "turn/plan_rate": mean([s.decision.plan_tokens > 0 for s in turns]),
        "turn/invalid_rate": mean([s.decision.fallback for s in turns]),
    }


# --------------------------------------------------------------------------- model pieces


class ValueHead(nn.Module):
    """V(s_t) from the policy's final hidden state at the last prompt token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def turn_forward(model, value_head: ValueHead, prompts, completions, *, temperature: float, pad_id: int):
    """One forward pass over prompt + generated tokens of a batch of turns.

    Returns per-token log-probs and entropies of the generated tokens ([B, T], each row's tokens
    right-aligned, marked by `mask`) and the value at the last prompt token ([B]). The turns of
    one iteration share their system prompt, which runs once for the batch
    (`dynaplan.train.prefix`); only the generated tokens' positions go through the LM head.
    The value head reads a detached hidden state: the critic is a linear probe on the policy's
    features, so a badly scaled return cannot push the LoRA weights around.
    """
    out = shared_prefix_forward(model, prompts, completions, pad_id=pad_id)
    logp_all = torch.log_softmax(out.answer_logits(model) / temperature, dim=-1)
    logprobs = logp_all.gather(-1, out.targets.unsqueeze(-1)).squeeze(-1) * out.mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * out.mask
    values = value_head(out.prompt_hidden().detach().float())
    return logprobs, entropy, out.mask, values


@contextmanager
def reference_policy(model, ablation: Ablation) -> Iterator[None]:
    """Run the body under the reference policy: the SFT adapter's frozen twin, or the bare base."""
    if ablation.start == "base":
        with model.disable_adapter():
            yield
        return
    model.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(POLICY)  # makes the policy adapter trainable again


def padded(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    """Right-align rows (as `turn_forward` lays out generated tokens) in a [B, width] tensor."""
    out = torch.zeros((len(rows), width))
    for b, row in enumerate(rows):
        if row:
            out[b, width - len(row):] = torch.tensor(row)
    return out


# --------------------------------------------------------------------------- checks and set-up


def check_settings(cfg: PpoParams, ablation: str) -> None:
    """Reject bad settings before anything is loaded or rolled out (ConfigError: exit code 2).
    pydantic already enforces these for params.yaml; this guards direct callers too."""
    if ablation not in ABLATIONS:
        raise ConfigError(f"ppo ablation {ablation!r} unknown; expected one of {', '.join(ABLATIONS)}")
    for key in ("num_envs", "episodes_per_iteration", "iterations", "max_steps", "minibatch_size", "update_epochs"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"ppo.{key}={getattr(cfg, key)} must be >= 1")
    for key in ("plan_cost", "plan_penalty", "kl_coef", "ent_coef", "vf_coef"):
        value = getattr(cfg, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"ppo.{key}={value} must be a finite number >= 0")


def check_reference_adapter(adapter_dir: Path, base_dir: Path) -> None:
    """The SFT adapter must belong to this base model (recorded base and LoRA shapes), checked
    with the hf backend's own rules before anything is rolled out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dynaplan.models.hf import AdapterMismatchError, _check_adapter_base, _check_adapter_shapes

    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"SFT adapter not found: {config_path} (run the sft stage first)")
    try:
        _check_adapter_base(base_dir, adapter_dir, json.loads(config_path.read_text()))
        with torch.device("meta"):  # shapes only, no weights
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
        _check_adapter_shapes(skeleton, adapter_dir)
    except AdapterMismatchError as err:
        raise ConfigError(f"reference adapter rejected: {err}") from None


def load_policy_model(base_dir: Path, ablation: Ablation, sft_adapter: Path | None, args: PpoParams):
    """The base model with the trainable adapter (and, for SFT starts, its frozen twin)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if ablation.start == "sft":
        try:
            model = PeftModel.from_pretrained(model, sft_adapter, adapter_name=POLICY, is_trainable=True)
            model.load_adapter(sft_adapter, adapter_name=REFERENCE, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"SFT adapter {sft_adapter} does not fit base model {base_dir}: {err}") from None
        model.set_adapter(POLICY)
    else:
        torch.manual_seed(args.seed)
        config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
            target_modules=list(args.lora_target_modules), task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config, adapter_name=POLICY)
    # Dropout off for good: the update must see the same function that sampled the tokens.
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


# --------------------------------------------------------------------------- checkpoints


def config_digest(cfg: PpoParams, ablation: str, extra: dict) -> str:
    payload = json.dumps({"ppo": cfg.model_dump(mode="json"), "ablation": ablation, **extra}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state into safetensors-storable tensors and a JSON skeleton."""
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).clone().contiguous()
    return tensors, {"param_groups": state["param_groups"], "indices": list(state["state"].keys())}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], skeleton: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": skeleton["param_groups"]})


def save_checkpoint(root: Path, iteration: int, model, tokenizer, value_head, optimizer, extra_state: dict, adapter_meta: dict) -> Path:
    """Write checkpoint `iter-NNNNNN` atomically (temp folder, rename, then the LATEST pointer)."""
    from safetensors.torch import save_file

    name = f"iter-{iteration:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The adapter folder is self-contained (tokenizer, chat template, metadata): evaluation and the
    # registry load it as they load an SFT adapter.
    model.save_pretrained(tmp / "adapter", selected_adapters=[POLICY])
    tokenizer.save_pretrained(tmp / "adapter")
    (tmp / "adapter" / "dynaplan_adapter.json").write_text(json.dumps({**adapter_meta, "iteration": iteration}, indent=2))
    save_file({k: v.contiguous() for k, v in value_head.state_dict().items()}, tmp / "value_head.safetensors")
    tensors, skeleton = optimizer_tensors(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    state = {
        "iteration": iteration,
        "optimizer": skeleton,
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": _jsonable(np.random.get_state()),
        **extra_state,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".LATEST.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / "LATEST")
    for old in sorted(root.glob("iter-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "LATEST"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def restore_checkpoint(path: Path, model, value_head, optimizer) -> dict:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter" / "adapter_model.safetensors"), adapter_name=POLICY)
    value_head.load_state_dict(load_file(path / "value_head.safetensors"))
    state = json.loads((path / "state.json").read_text())
    load_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy_rng"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    return state


# --------------------------------------------------------------------------- the loop


def update(model, value_head: ValueHead, optimizer, turns: Turns, args: PpoParams, ablation: Ablation, *,
           pad_id: int, iteration: int, last_checkpoint: Path | None = None) -> dict:
    """Score the iteration's turns (old values, reference log-probs), compute the cost-charged
    rewards and GAE, then run epochs of shuffled minibatches of the clipped PPO loss."""
    lora_params = [p for group in optimizer.param_groups[:1] for p in group["params"]]
    # ---- old values, reference log-probs (adapter switch, no second model), rewards, GAE
    t1 = time.perf_counter()
    n = len(turns)
    device = next(value_head.parameters()).device
    gen_len = max(1, max(len(c) for c in turns.token_ids))
    oldlogprob = padded(turns.logprobs, gen_len).to(device)
    oldvalues = torch.zeros(n, device=device)
    reflogprob, recomputed = torch.zeros(n, gen_len, device=device), torch.zeros(n, gen_len, device=device)
    with torch.no_grad():
        for lo in range(0, n, args.minibatch_size):
            idx = list(range(lo, min(n, lo + args.minibatch_size)))
            prompts, comps = [turns.prompt_token_ids[i] for i in idx], [turns.token_ids[i] for i in idx]
            logp, _, _, values = turn_forward(model, value_head, prompts, comps, temperature=args.temperature, pad_id=pad_id)
            width = logp.shape[1]
            recomputed[idx, gen_len - width:] = logp
            oldvalues[idx] = values
            if args.kl_coef > 0:
                with reference_policy(model, ablation):
                    ref, _, _, _ = turn_forward(model, value_head, prompts, comps, temperature=args.temperature, pad_id=pad_id)
                reflogprob[idx, gen_len - width:] = ref
    rewards = turn_rewards(
        turns.env_rewards, turns.plan_tokens, turns.planned,
        reward_scale=args.reward_scale, plan_cost=args.plan_cost, plan_penalty=args.plan_penalty,
    )
    advantages, returns = compute_gae(rewards, oldvalues.cpu().numpy(), turns.dones, gamma=args.gamma, gae_lambda=args.gae_lambda)
    advantages_t = torch.tensor(advantages, dtype=torch.float32, device=device)
    returns_t = torch.tensor(returns, dtype=torch.float32, device=device)
    t_score = time.perf_counter() - t1

    # ---- update: epochs of shuffled minibatches over turns
    t2 = time.perf_counter()
    rng = np.random.default_rng([args.seed, iteration])
    clipfracs, stats = [], {"pg_loss": [], "v_loss": [], "entropy": [], "kl": [], "approx_kl": []}
    trained_tokens = 0
    for epoch in range(args.update_epochs):
        order = rng.permutation(n)
        for lo in range(0, n, args.minibatch_size):
            mb = order[lo : lo + args.minibatch_size].tolist()
            prompts, comps = [turns.prompt_token_ids[i] for i in mb], [turns.token_ids[i] for i in mb]
            newlogprob, entropy, mask, newvalue = turn_forward(
                model, value_head, prompts, comps, temperature=args.temperature, pad_id=pad_id
            )
            width = newlogprob.shape[1]
            mb_old, mb_ref = oldlogprob[mb, gen_len - width:], reflogprob[mb, gen_len - width:]
            mb_adv = advantages_t[mb]
            if args.norm_adv and len(mb) > 1:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg_loss, clipfrac, approx_kl, _ = policy_loss(newlogprob, mb_old, mb_adv, mask, args.clip_coef)
            v_loss = value_loss(newvalue, oldvalues[mb], returns_t[mb], args.clip_coef)
            entropy_loss = masked_turn_mean(entropy, mask)
            kl = kl_to_reference(newlogprob, mb_ref, mask) if args.kl_coef > 0 else torch.zeros((), device=device)
            loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss + args.kl_coef * kl
            if not torch.isfinite(loss):
                raise PpoDivergence(
                    f"non-finite loss at iteration {iteration + 1}, epoch {epoch + 1} (pg_loss={pg_loss.item()}, "
                    f"v_loss={v_loss.item()}, kl={kl.item()}); stopped, the last good checkpoint is "
                    f"{last_checkpoint or 'none (nothing saved yet)'}; lower ppo.learning_rate or check the rewards"
                )
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(lora_params + list(value_head.parameters()), args.max_grad_norm)
            optimizer.step()
            trained_tokens += sum(len(p) + len(c) for p, c in zip(prompts, comps))
            clipfracs.append(clipfrac.item())
            for key, value in (("pg_loss", pg_loss), ("v_loss", v_loss), ("entropy", entropy_loss), ("kl", kl), ("approx_kl", approx_kl)):
                stats[key].append(value.item())
    t_update = time.perf_counter() - t2

    return {
        "episode/shaped_return_sum": float(rewards.sum()),
        "losses/policy_loss": float(np.mean(stats["pg_loss"])),
        "losses/value_loss": float(np.mean(stats["v_loss"])),
        "losses/entropy": float(np.mean(stats["entropy"])),
        "losses/kl_ref": float(np.mean(stats["kl"])),
        "losses/approx_kl": float(np.mean(stats["approx_kl"])),
        "losses/clipfrac": float(np.mean(clipfracs)),
        "losses/explained_variance": explained_variance(oldvalues.cpu().numpy(), returns),
        "rollout/logprob_max_abs_diff": float((recomputed - oldlogprob).abs().max()),
        "perf/score_s": t_score,
        "perf/update_s": t_update,
        "perf/update_tokens": trained_tokens,
        "perf/update_tokens_per_s": trained_tokens / max(t_update, 1e-9),
    }


@dataclass
class PpoResult:
    checkpoint_dir: Path
    history: list[dict]
    checkpoint: Path | None


def train(
    params: Params,
    ablation_name: str,
    *,
    base_dir: Path,
    sft_adapter: Path | None,
    checkpoint_dir: Path,
    log: Callable[[dict, int], None] | None = None,
    on_checkpoint: Callable[[Path, int, dict], None] | None = None,
    progress: bool = True,
) -> PpoResult:
    """Run PPO for `params.ppo.iterations` iterations, resuming from the last checkpoint in
    `checkpoint_dir` if it was written with the same settings. Raises ConfigError on bad input
    before anything is rolled out, PpoDivergence on a non-finite loss."""
    from dynaplan.agent.policy import LLMPolicy
    from dynaplan.envs import make_env
    from dynaplan.models.base import SamplingParams
    from dynaplan.train.rollout import run_episodes

    args = params.ppo
    check_settings(args, ablation_name)
    ablation = ABLATIONS[ablation_name]
    base_dir, ckpt_root = Path(base_dir), Path(checkpoint_dir)
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"base model not found: {base_dir}/config.json (run the base_model stage first)")
    from dynaplan.train.sft import base_fingerprint

    base_fp = base_fingerprint(base_dir)
    if ablation.start == "sft":
        if sft_adapter is None:
            raise ConfigError(f"ablation {ablation_name} starts from an SFT adapter; none given")
        check_reference_adapter(Path(sft_adapter), base_dir)
    env_kwargs = params.envs.model_dump()[args.env]
    first_seed = params.seeds.train_start
    last_seed = first_seed + args.iterations * args.episodes_per_iteration
    if first_seed <= params.seeds.eval_start < last_seed:
        raise ConfigError(
            f"PPO env seeds [{first_seed}, {last_seed}) reach seeds.eval_start={params.seeds.eval_start}: "
            "lower ppo.iterations or ppo.episodes_per_iteration, or move seeds.eval_start"
        )
    probe = make_env(args.env, **env_kwargs)
    action_names, rules = probe.action_names, probe.rules
    # POGS's default (stay put, an invalid move) depends on where the agent is: read it per step.
    default_action = (lambda info: str(info["current_node"])) if args.env == "pogs" else probe.default_action
    probe.close()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy_model(base_dir, ablation, sft_adapter, args)
    value_head = ValueHead(model.get_base_model().config.hidden_size).to(next(model.parameters()).device)
    optimizer = torch.optim.Adam(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": args.learning_rate},
            {"params": list(value_head.parameters()), "lr": args.value_learning_rate},
        ],
        eps=1e-5,
    )
    digest = config_digest(args, ablation_name, {"sft_adapter": str(sft_adapter), "base": str(base_dir), "env": env_kwargs})
    start_iteration, seed_cursor, history = 0, first_seed, []
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = json.loads((latest / "state.json").read_text())
        if state.get("config_digest") == digest:
            state = restore_checkpoint(latest, model, value_head, optimizer)
            start_iteration, seed_cursor, history = state["iteration"], state["seed_cursor"], state["history"]
        else:
            shutil.rmtree(ckpt_root)  # other settings: these checkpoints are not this run's past
            latest = None
    checkpoint = latest
    backend = make_rollout_backend(args, model, tokenizer, base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = SamplingParams(temperature=args.temperature, top_p=1.0, max_new_tokens=params.prompt.max_new_tokens)

    for iteration in range(start_iteration, args.iterations):
        t0 = time.perf_counter()
        # ---- rollout: whole episodes, lockstep envs, one batched generation per step
        seeds = list(range(seed_cursor, seed_cursor + args.episodes_per_iteration))
        backend.sync(model, ckpt_root, iteration)
        policy = LLMPolicy(
            backend, action_names=action_names, default_action=default_action, rules=rules, mode=ablation.mode,
            history_len=params.prompt.history_len, max_prompt_tokens=params.prompt.max_prompt_tokens,
            sampling=sampling, seed=args.seed * 1_000_003 + iteration,
        )
        with torch.no_grad():
            episodes = run_episodes(
                policy, args.env, env_kwargs, seeds, num_envs=args.num_envs, max_steps=args.max_steps,
                progress=progress, description=f"ppo {ablation_name} iter {iteration + 1}/{args.iterations}",
            )
        turns = collect_turns(episodes)
        t_rollout = time.perf_counter() - t0

        # ---- score, rewards with the plan cost, GAE, then epochs of minibatch updates
        result = update(model, value_head, optimizer, turns, args, ablation, pad_id=pad_id, iteration=iteration,
                        last_checkpoint=checkpoint)

        # ---- log
        seed_cursor += args.episodes_per_iteration
        wall = time.perf_counter() - t0
        generated = sum(len(c) for c in turns.token_ids)
        metrics = {
            **episode_stats(episodes),
            "episode/shaped_return": result.pop("episode/shaped_return_sum") / max(1, len(episodes)),
            **result,
            "rollout/turns": len(turns),
            "perf/rollout_s": t_rollout,
            "perf/rollout_share": t_rollout / wall,
            "perf/rollout_tokens_per_s": generated / max(t_rollout, 1e-9),
            "perf/turns_per_s": len(turns) / max(t_rollout, 1e-9),
        }
        history.append({"iteration": iteration + 1, **metrics})
        if log is not None:
            log(metrics, iteration + 1)
        if (iteration + 1) % args.checkpoint_every == 0 or iteration + 1 == args.iterations:
            checkpoint = save_checkpoint(
                ckpt_root, iteration + 1, model, tokenizer, value_head, optimizer,
                {"seed_cursor": seed_cursor, "history": history, "config_digest": digest, "ablation": ablation_name},
                {"stage": "ppo", "ablation": ablation_name, "mode": ablation.mode, "plan_cost": args.plan_cost,
                 "plan_penalty": args.plan_penalty, "env": args.env, "sft_adapter": str(sft_adapter) if sft_adapter else None,
                 # what the registry's pyfunc and the SFT checks compare with the base they load
                 "base_model": params.model.base, "base_fingerprint": base_fp},
            )
            if on_checkpoint is not None:
                on_checkpoint(checkpoint, iteration + 1, metrics)
    backend.close()
    return PpoResult(checkpoint_dir=ckpt_root, history=history, checkpoint=checkpoint)


# --------------------------------------------------------------------------- the DVC stage


@dataclass(frozen=True)
class PpoPaths:
    base_dir: Path  # models/base
    sft_root: Path  # folder holding sft-<variant>/adapter
    out_dir: Path  # models/ppo-<ablation>: the final adapter/ and value_head.safetensors
    checkpoint_dir: Path  # checkpoints/ppo-<ablation>: the resume point (kept across runs)
    metrics_path: Path  # metrics/ppo-<ablation>.json (the DVC metric)

    @property
    def curve_path(self) -> Path:  # metrics/ppo-<ablation>-curve.csv: one row per iteration (dvc plots)
        return self.metrics_path.with_name(self.metrics_path.stem + "-curve.csv")

    def sft_adapter(self, ablation: Ablation) -> Path | None:
        return None if ablation.sft_variant is None else self.sft_root / f"sft-{ablation.sft_variant}" / "adapter"


def _example_messages(params: Params, ablation: Ablation) -> list[dict[str, str]]:
    """A real first-turn prompt of this ablation: the registered model's input example."""
    from dynaplan.agent.prompts import build_messages
    from dynaplan.envs import make_env

    env = make_env(params.ppo.env, **params.envs.model_dump()[params.ppo.env])
    observation, _ = env.reset(seed=params.seeds.train_start)
    env.close()
    return build_messages(rules=env.rules, mode=ablation.mode, observation=observation, history_len=params.prompt.history_len)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_curve(path: Path, history: list[dict]) -> None:
    import csv

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    columns = list(history[0])
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c.replace("/", "_") for c in columns])
        writer.writeheader()
        for row in history:
            writer.writerow({c.replace("/", "_"): row.get(c) for c in columns})
    os.replace(tmp, path)


def ppo_stage(params: Params, ablation_name: str, paths: PpoPaths, progress: bool = True) -> dict:
    """One `ppo@<ablation>` execution: a tracked run that trains (or resumes), logs every
    iteration, registers each checkpoint as a `dynaplan-agent` version (stage=ppo, plan_cost,
    ablation), exports the final adapter and value head and writes the metrics JSON."""
    from dynaplan import tracking

    check_settings(params.ppo, ablation_name)
    ablation = ABLATIONS[ablation_name]
    sft_adapter = paths.sft_adapter(ablation)
    if sft_adapter is not None:
        check_reference_adapter(sft_adapter, paths.base_dir)
    dataset_digest = "online-rollouts"
    if sft_adapter is not None and (sft_adapter / "dynaplan_adapter.json").is_file():
        dataset_digest = json.loads((sft_adapter / "dynaplan_adapter.json").read_text()).get("dataset_digest", dataset_digest)
    example = _example_messages(params, ablation)
    versions: dict[int, str] = {}

    def register(checkpoint: Path, iteration: int, metrics: dict) -> None:
        info = tracking.log_agent_model(
            checkpoint / "adapter", paths.base_dir, example_messages=example, base_model=params.model.base,
            name=f"ppo-{ablation_name}-iter-{iteration}", max_new_tokens=params.prompt.max_new_tokens, step=iteration,
        )
        version = tracking.register_agent(
            info.model_uri, stage="ppo", variant=ablation_name, base_model=params.model.base,
            dataset_digest=dataset_digest, plan_cost=params.ppo.plan_cost,
            extra_tags={"ablation": ablation_name, "planning_mode": ablation.mode, "iteration": str(iteration),
                        "plan_penalty": str(params.ppo.plan_penalty), "env": params.ppo.env,
                        "final": str(iteration == params.ppo.iterations).lower()},
        )
        tracking.set_version_metrics(version.version, metrics, prefix="ppo.")
        tracking.log_artifact(checkpoint / "value_head.safetensors", artifact_path=f"value_head/iter-{iteration}")
        versions[iteration] = str(version.version)

    section = {"ppo": params.ppo, "prompt": params.prompt, "model": params.model, "envs": params.envs, "seeds": params.seeds}
    with tracking.stage_run(f"ppo@{ablation_name}", section, ablation=ablation_name, plan_cost=params.ppo.plan_cost):
        result = train(
            params, ablation_name, base_dir=paths.base_dir, sft_adapter=sft_adapter, checkpoint_dir=paths.checkpoint_dir,
            log=tracking.log_metrics, on_checkpoint=register, progress=progress,
        )
        paths.out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("adapter", "value_head.safetensors"):
            tmp = paths.out_dir / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            source = result.checkpoint / name
            shutil.copytree(source, tmp) if source.is_dir() else shutil.copyfile(source, tmp)
            final = paths.out_dir / name
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(tmp, final)
        last = result.history[-1]
        iteration = last["iteration"]
        if iteration not in versions:  # resumed after the last checkpoint: nothing new was registered
            register(result.checkpoint, iteration, last)
        version = versions[iteration]
        out = {
            "ablation": ablation_name, "plan_cost": params.ppo.plan_cost, "plan_penalty": params.ppo.plan_penalty,
            "iterations": iteration, "env": params.ppo.env,
            "progression": last["episode/progression"], "return": last["episode/return"],
            "plan_tokens_per_episode": last["episode/plan_tokens"], "plan_rate": last["turn/plan_rate"],
            "generated_tokens_per_episode": last["episode/generated_tokens"],
            "first": {k: v for k, v in result.history[0].items() if k.startswith(("episode/", "turn/"))},
            "last": last,
            "model_version": version,
            "model_uri": f"models:/{tracking.AGENT_MODEL}/{version}",
        }
        _write_json(paths.metrics_path, out)
        _write_curve(paths.curve_path, result.history)
        tracking.log_artifact(paths.metrics_path)
    return out


# --------------------------------------------------------------------------- rollout engines


class SharedHFRollouts:
    """CPU rollouts: the hf backend generates with the training model itself (no copy, no sync)."""

    def __init__(self, model, tokenizer):
        from dynaplan.models.hf import HFBackend

        self.backend = HFBackend.from_model(model, tokenizer)

    def sync(self, model, out_dir: Path, iteration: int) -> None:
        # The same weights are trained and sampled; only the cached system-prompt KV is stale.
        self.backend.clear_prefix_cache()

    def close(self) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self.backend, name)


def make_rollout_backend(args: PpoParams, model, tokenizer, base_dir: Path):
    if args.rollout_backend == "hf":
        return SharedHFRollouts(model, tokenizer)
    return ServedLoraRollouts(args, tokenizer, base_dir)


class ServedLoraRollouts:
    """GPU rollouts: after each update the policy adapter is saved and handed to vLLM, in process
    (a new LoRARequest per iteration) or through `vllm serve --enable-lora`'s runtime adapter API
    (`POST /v1/load_lora_adapter`; the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""

    def __init__(self, args: PpoParams, tokenizer, base_dir: Path):
        self.args, self.tokenizer, self.base_dir, self.backend, self.loaded = args, tokenizer, base_dir, None, None

    def sync(self, model, out_dir: Path, iteration: int) -> None:
        name = f"ppo-iter-{iteration:06d}"
        adapter_dir = (out_dir / "rollout_adapters" / name).resolve()
        tmp = adapter_dir.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, selected_adapters=[POLICY])
        shutil.rmtree(adapter_dir, ignore_errors=True)
        os.replace(tmp, adapter_dir)
        if self.args.rollout_backend == "openai":
            import httpx

            base = self.args.server_url.rstrip("/")
            response = httpx.post(f"{base}/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter_dir)}, timeout=120)
            response.raise_for_status()
            if self.loaded:
                httpx.post(f"{base}/unload_lora_adapter", json={"lora_name": self.loaded}, timeout=120)
            from dynaplan.models.openai import OpenAIBackend

            self.backend = OpenAIBackend(base, name, tokenizer=self.tokenizer)
        else:
            from dynaplan.models.vllm import VLLMBackend

            if self.backend is None:
                # The trainer shares the GPU: leave it room for the policy, its grads and Adam.
                self.backend = VLLMBackend(str(self.base_dir), str(adapter_dir), gpu_memory_utilization=0.4)
            else:
                self.backend.set_lora(str(adapter_dir))
        self.loaded = name

    def close(self) -> None:
        pass

    def __getattr__(self, name):
        if name in ("backend", "args", "tokenizer", "loaded", "base_dir"):
            raise AttributeError(name)
        return getattr(self.backend, name)
