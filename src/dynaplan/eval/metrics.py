"""Evaluation metrics: pure functions from recorded episodes to numbers (DESIGN.md section 4).

Input is the episode record the runner persists (a dict with `steps`, `achievements`, ...); output
is plain dicts of floats. No env, model, file or MLflow access here, so every formula is testable
on hand-written episodes.

Episode record (keys read here)::

    {"env": "crafter", "seed": 1000000, "attempt": 0, "episode_id": "...",
     "length": int, "reward": float, "progression": float,
     "achievements": {name: first_unlock_step},
     "steps": [{"step", "action", "valid", "fallback", "planned", "plan_text",
                "plan_tokens", "new_tokens", "reward", ...}, ...]}
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence

# Crafter's 22 achievements, in crafter's own (sorted) order: `crafter.constants.achievements`.
# Spelled out so that metrics need no crafter import; a test checks they agree.
CRAFTER_ACHIEVEMENTS: tuple[str, ...] = (
    "collect_coal", "collect_diamond", "collect_drink", "collect_iron", "collect_sapling",
    "collect_stone", "collect_wood", "defeat_skeleton", "defeat_zombie", "eat_cow", "eat_plant",
    "make_iron_pickaxe", "make_iron_sword", "make_stone_pickaxe", "make_stone_sword",
    "make_wood_pickaxe", "make_wood_sword", "place_furnace", "place_plant", "place_stone",
    "place_table", "wake_up",
)
POGS_ACHIEVEMENTS: tuple[str, ...] = ("reach_target",)
# The paper's follow-through statistic: a plan counts as replaced when a new plan follows it
# within this many steps (SFT+RL: 41% abandoned, 20% completed within 15 steps).
FOLLOW_THROUGH_WINDOW = 15
# Means with a standard error in the aggregate (per-episode values, then mean and SE).
MEAN_KEYS: tuple[str, ...] = (
    "progression", "num_achievements", "reward", "length", "plans", "plan_rate", "plan_tokens",
    "generated_tokens", "invalid_rate", "valid_rate",
)


def achievement_names(env: str) -> tuple[str, ...]:
    if env == "crafter":
        return CRAFTER_ACHIEVEMENTS
    if env == "pogs":
        return POGS_ACHIEVEMENTS
    raise ValueError(f"unknown env {env!r}; expected crafter or pogs")


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean (sample std with ddof=1 over sqrt(n)); 0 for n < 2."""
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def crafter_score(success_rates_percent: Iterable[float]) -> float:
    """Crafter score (Hafner 2022): exp(mean(ln(1 + s_i))) - 1, s_i the success rates in percent."""
    rates = list(success_rates_percent)
    if not rates:
        raise ValueError("crafter_score needs at least one success rate")
    for r in rates:
        if not 0.0 <= r <= 100.0:
            raise ValueError(f"success rates are percentages in [0, 100], got {r}")
    return math.exp(sum(math.log1p(r) for r in rates) / len(rates)) - 1.0


def success_rates(episodes: Sequence[Mapping], names: Sequence[str]) -> dict[str, float]:
    """Per-achievement success rate in percent: share of episodes that unlocked it at least once."""
    if not episodes:
        return {name: 0.0 for name in names}
    return {
        name: 100.0 * sum(1 for ep in episodes if name in ep["achievements"]) / len(episodes)
        for name in names
    }


def plans_replaced_within(plan_steps: Sequence[int], window: int = FOLLOW_THROUGH_WINDOW) -> int:
    """How many plans a new plan replaced at most `window` steps later (the last plan never is)."""
    steps = sorted(plan_steps)
    return sum(1 for a, b in zip(steps, steps[1:]) if b - a <= window)


def episode_metrics(episode: Mapping) -> dict:
    """Per-episode numbers: progression, reward, length, plan and token counts, validity rates.

    Plan means (`mean_plan_tokens`, `mean_plan_chars`, `plan_replaced_within_15`) are None for
    an episode without plans; `first_unlock` maps each unlocked achievement to its first step.
    """
    steps = episode["steps"]
    length = len(steps)
    plan_steps = [s["step"] for s in steps if s.get("planned")]
    plan_tokens = [int(s.get("plan_tokens") or 0) for s in steps if s.get("planned")]
    plan_chars = [len(s.get("plan_text") or "") for s in steps if s.get("planned")]
    plans = len(plan_steps)
    replaced = plans_replaced_within(plan_steps)
    invalid = sum(1 for s in steps if s.get("fallback"))
    valid = sum(1 for s in steps if s.get("valid", True))
    return {
        "episode_id": episode["episode_id"],
        "seed": int(episode["seed"]),
        "attempt": int(episode.get("attempt", 0)),
        "progression": float(episode["progression"]),
        "num_achievements": len(episode["achievements"]),
        "reward": float(episode["reward"]),
        "length": length,
        "plans": plans,
        "plan_rate": plans / length if length else 0.0,
        "plan_tokens": sum(plan_tokens),
        "generated_tokens": sum(int(s.get("new_tokens") or 0) for s in steps),
        "mean_plan_tokens": mean(plan_tokens) if plans else None,
        "mean_plan_chars": mean(plan_chars) if plans else None,
        "plans_replaced": replaced,
        "plan_replaced_within_15": replaced / plans if plans else None,
        "invalid_actions": invalid,
        "invalid_rate": invalid / length if length else 0.0,
        "valid_rate": valid / length if length else 1.0,
        "first_unlock": dict(sorted(episode["achievements"].items())),
    }


def bootstrap_se(episodes: Sequence[Mapping], statistic, samples: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of a statistic over episodes (resampled with replacement)."""
    if len(episodes) < 2:
        return 0.0
    rng = random.Random(seed)
    values = [statistic([episodes[rng.randrange(len(episodes))] for _ in episodes]) for _ in range(samples)]
    m = sum(values) / len(values)
    # The spread of the resampled statistic itself (not the standard error of its mean).
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(episodes: Sequence[Mapping], env: str) -> dict:
    """Aggregate metrics over episodes: means with standard errors, pooled plan statistics,
    per-achievement success rates and mean first-unlock steps, and (Crafter) the Crafter score
    with a bootstrap standard error."""
    if not episodes:
        raise ValueError("aggregate needs at least one episode")
    names = achievement_names(env)
    per_episode = [episode_metrics(ep) for ep in episodes]
    out: dict = {"episodes": len(episodes)}
    for key in MEAN_KEYS:
        values = [float(m[key]) for m in per_episode]
        out[key] = mean(values)
        out[f"{key}_se"] = standard_error(values)
    total_plans = sum(m["plans"] for m in per_episode)
    # Pooled over all plans (as the paper's "20% of plans"), not a mean of per-episode shares.
    out["mean_plan_tokens"] = sum(m["plan_tokens"] for m in per_episode) / total_plans if total_plans else 0.0
    out["mean_plan_chars"] = (
        sum(len(s.get("plan_text") or "") for ep in episodes for s in ep["steps"] if s.get("planned")) / total_plans
        if total_plans else 0.0
    )
    replaced = sum(m["plans_replaced"] for m in per_episode)
    out["plan_replaced_within_15"] = replaced / total_plans if total_plans else 0.0
    out["plan_follow_through"] = 1.0 - out["plan_replaced_within_15"] if total_plans else 0.0
    rates = success_rates(episodes, names)
    out["success_rates"] = rates
    out["first_unlock_mean"] = {
        name: mean([float(ep["achievements"][name]) for ep in episodes if name in ep["achievements"]])
        for name in names if rates[name] > 0
    }
    if env == "crafter":
        out["crafter_score"] = crafter_score(rates.values())
        out["crafter_score_se"] = bootstrap_se(
            episodes, lambda sample: crafter_score(success_rates(sample, names).values())
        )
    return out


def best_of_n(episodes: Sequence[Mapping], env: str) -> dict:
    """Best-of-N over attempts of the same seed: the best episode per seed (highest progression,
    then reward, then fewest generated tokens) and any-of-N success per achievement."""
    if not episodes:
        raise ValueError("best_of_n needs at least one episode")
    names = achievement_names(env)
    by_seed: dict[int, list[Mapping]] = {}
    for ep in episodes:
        by_seed.setdefault(int(ep["seed"]), []).append(ep)

    def rank(ep: Mapping):
        tokens = sum(int(s.get("new_tokens") or 0) for s in ep["steps"])
        return (float(ep["progression"]), float(ep["reward"]), -tokens)

    best = [max(group, key=rank) for _, group in sorted(by_seed.items())]
    union = [
        {"achievements": {n: 0 for group_ep in group for n in group_ep["achievements"]}}
        for _, group in sorted(by_seed.items())
    ]
    rates = success_rates(union, names)
    top = max(best, key=rank)
    progression = [float(ep["progression"]) for ep in best]
    out = {
        "n": max(len(group) for group in by_seed.values()),
        "seeds": len(by_seed),
        "progression": mean(progression),
        "progression_se": standard_error(progression),
        "success_rates": rates,
        "best_episode": {
            "episode_id": top["episode_id"],
            "seed": int(top["seed"]),
            "attempt": int(top.get("attempt", 0)),
            "progression": float(top["progression"]),
            "achievements": dict(sorted(top["achievements"].items())),
        },
    }
    if env == "crafter":
        out["crafter_score"] = crafter_score(rates.values())
    return out
