"""The promotion gate: decide whether the `challenger` version of the agent replaces the `champion`.

Pure decision logic over per-seed results (progression and generated tokens per episode on the
same held-out seeds); registry reads and writes go through `dynaplan.tracking`. It never
evaluates a model itself and never promotes a version that has no evaluation on those seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

CHALLENGER = "challenger"
CHAMPION = "champion"
# A version's held-out evaluation is stored on the version itself (one tag per env), so a later
# promotion reuses it instead of evaluating the same weights on the same seeds again.
EVAL_TAG_PREFIX = "dynaplan.eval.heldout."
DECISION_TAG = "dynaplan.promotion.decision"
OUTCOME_TAG = "dynaplan.promotion.outcome"

Outcome = Literal["promoted", "first_champion", "kept", "already_champion"]


class PromotionError(RuntimeError):
    """A promotion that must not happen (no candidate, an unevaluated version, mismatched seeds).
    The message says which version and what to run first; nothing in the registry was changed."""


class NoCandidate(PromotionError):
    """No version carries the `challenger` alias: there is nothing to decide (not a failure of
    a pipeline run; `run_gate` records it and returns None)."""


@dataclass(frozen=True)
class Evaluation:
    """One version's results on the held-out seeds, one entry per seed, in seed order."""

    version: str
    seeds: tuple[int, ...]
    progression: tuple[float, ...]
    tokens: tuple[float, ...]  # all generated tokens (plans and actions) per episode

    def __post_init__(self) -> None:
        if not (len(self.seeds) == len(self.progression) == len(self.tokens)):
            raise ValueError(
                f"version {self.version}: {len(self.seeds)} seeds but {len(self.progression)} "
                f"progression values and {len(self.tokens)} token counts"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"version {self.version}: duplicate seeds in its evaluation")

    @property
    def mean_progression(self) -> float:
        return _mean(self.progression)

    @property
    def tokens_per_episode(self) -> float:
        return _mean(self.tokens)

    @classmethod
    def from_episodes(cls, version: str, episodes: Sequence[Mapping[str, Any]]) -> "Evaluation":
        """Build from the evaluation runner's episode records (one attempt per seed)."""
        from dynaplan.eval.metrics import episode_metrics

        rows = sorted(((int(ep["seed"]), episode_metrics(ep)) for ep in episodes), key=lambda r: r[0])
        return cls(
            version=str(version),
            seeds=tuple(seed for seed, _ in rows),
            progression=tuple(float(m["progression"]) for _, m in rows),
            tokens=tuple(float(m["generated_tokens"]) for _, m in rows),
        )

    def to_tag(self) -> str:
        return json.dumps(
            {"seeds": list(self.seeds), "progression": list(self.progression), "tokens": list(self.tokens)},
            separators=(",", ":"),
        )

    @classmethod
    def from_tag(cls, version: str, text: str) -> "Evaluation":
        data = json.loads(text)
        return cls(
            version=str(version),
            seeds=tuple(int(s) for s in data["seeds"]),
            progression=tuple(float(p) for p in data["progression"]),
            tokens=tuple(float(t) for t in data["tokens"]),
        )

    def on_seeds(self, seeds: Sequence[int]) -> "Evaluation | None":
        """The subset on exactly `seeds` (in that order), or None if any seed is missing."""
        index = {seed: i for i, seed in enumerate(self.seeds)}
        if any(seed not in index for seed in seeds):
            return None
        picked = [index[seed] for seed in seeds]
        return Evaluation(
            self.version,
            tuple(seeds),
            tuple(self.progression[i] for i in picked),
            tuple(self.tokens[i] for i in picked),
        )


@dataclass(frozen=True)
class Decision:
    """What the gate decided and every number it decided on (the JSON record and the tags)."""

    outcome: Outcome
    promoted: bool
    model_name: str
    candidate_version: str
    champion_version: str | None
    reason: str
    seeds: list[int]
    margin_se: float
    max_tokens_per_episode: float
    candidate_progression: float
    candidate_tokens_per_episode: float
    within_token_budget: bool
    champion_progression: float | None = None
    champion_tokens_per_episode: float | None = None
    mean_difference: float | None = None
    paired_se: float | None = None
    threshold: float | None = None
    candidate_per_seed: list[float] = field(default_factory=list)
    champion_per_seed: list[float] | None = None
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The scalar numbers (short enough for a registry tag)."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, list)}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def paired_difference(candidate: Sequence[float], champion: Sequence[float]) -> tuple[float, float]:
    """Mean of the per-seed differences candidate - champion and its standard error
    (sample std, ddof=1, over sqrt(n)); the pairing removes the seed-to-seed variance that both
    agents share, which is why the gate compares on the same seeds."""
    if len(candidate) != len(champion) or not candidate:
        raise ValueError(f"paired difference needs equal, non-empty lists (got {len(candidate)} and {len(champion)})")
    diffs = [c - d for c, d in zip(candidate, champion)]
    n = len(diffs)
    mean_diff = sum(diffs) / n
    if n < 2:
        return mean_diff, float("inf")  # one seed says nothing about the spread: never enough
    var = sum((d - mean_diff) ** 2 for d in diffs) / (n - 1)
    return mean_diff, math.sqrt(var / n)


def unevaluated_message(model_name: str, version: str, role: str, seeds: Sequence[int], env: str) -> str:
    span = f"{seeds[0]}..{seeds[-1]}" if seeds else "(none)"
    return (
        f"refusing to promote: {role} version {version} of {model_name} has no evaluation on the "
        f"{len(seeds)} held-out {env} seeds {span}; evaluate it first (`dynaplan promote` with "
        f"promote.evaluate_missing=true does, or record one with dynaplan.promotion.record_evaluation)"
    )


def decide(
    candidate: Evaluation,
    champion: Evaluation | None,
    *,
    model_name: str,
    seeds: Sequence[int],
    margin_se: float,
    max_tokens_per_episode: float,
) -> Decision:
    """The rule: promote when mean(candidate - champion) over the same seeds exceeds
    `margin_se` paired standard errors and the candidate's tokens per episode fit the budget.
    With no champion, the evaluated candidate becomes the first champion. A tie never promotes
    (the difference must be strictly greater than the threshold, and the threshold is >= 0)."""
    if margin_se < 0:
        raise ValueError(f"margin_se must be >= 0, got {margin_se}")
    seeds = [int(s) for s in seeds]
    cand = candidate.on_seeds(seeds)
    if cand is None:
        raise PromotionError(f"candidate version {candidate.version}: evaluation lacks some of the seeds {seeds}")
    within_budget = cand.tokens_per_episode <= max_tokens_per_episode
    common = dict(
        model_name=model_name,
        candidate_version=cand.version,
        seeds=seeds,
        margin_se=margin_se,
        max_tokens_per_episode=max_tokens_per_episode,
        candidate_progression=cand.mean_progression,
        candidate_tokens_per_episode=cand.tokens_per_episode,
        within_token_budget=within_budget,
        candidate_per_seed=list(cand.progression),
    )
    if champion is None:
        return Decision(
            outcome="first_champion", promoted=True, champion_version=None,
            reason=f"no champion yet: evaluated version {cand.version} becomes the first champion",
            **common,
        )
    champ = champion.on_seeds(seeds)
    if champ is None:
        raise PromotionError(f"champion version {champion.version}: evaluation lacks some of the seeds {seeds}")
    numbers = dict(
        champion_version=champ.version,
        champion_progression=champ.mean_progression,
        champion_tokens_per_episode=champ.tokens_per_episode,
        champion_per_seed=list(champ.progression),
    )
    if champ.version == cand.version:
        return Decision(
            outcome="already_champion", promoted=False,
            reason=f"version {cand.version} is already the champion", **numbers, **common,
        )
    mean_diff, se = paired_difference(cand.progression, champ.progression)
    threshold = margin_se * se
    numbers.update(mean_difference=mean_diff, paired_se=se, threshold=threshold)
    better = mean_diff > threshold
    if better and within_budget:
        outcome, promoted = "promoted", True
        reason = (
            f"progression +{mean_diff:.4f} over champion {champ.version} exceeds {margin_se:g} x paired SE "
            f"({threshold:.4f}) at {cand.tokens_per_episode:.0f} tokens/episode (budget {max_tokens_per_episode:g})"
        )
    elif not better:
        outcome, promoted = "kept", False
        reason = (
            f"progression difference {mean_diff:+.4f} vs champion {champ.version} does not exceed "
            f"{margin_se:g} x paired SE ({threshold:.4f}): champion kept"
        )
    else:
        outcome, promoted = "kept", False
        reason = (
            f"better by {mean_diff:+.4f} but {cand.tokens_per_episode:.0f} tokens/episode exceed the "
            f"budget of {max_tokens_per_episode:g}: champion kept"
        )
    return Decision(outcome=outcome, promoted=promoted, reason=reason, **numbers, **common)


def stored_evaluation(model_name: str, version: str, env: str, seeds: Sequence[int]) -> Evaluation | None:
    """The version's recorded evaluation on exactly `seeds` (a subset of a larger one counts)."""
    from dynaplan import tracking

    text = tracking.version_tags(model_name, version).get(EVAL_TAG_PREFIX + env)
    if not text:
        return None
    return Evaluation.from_tag(version, text).on_seeds(list(seeds))


def record_evaluation(model_name: str, evaluation: Evaluation, env: str) -> None:
    """Store a version's per-seed held-out results on the version (what `promote` reads)."""
    from dynaplan import tracking

    tracking.set_version_tags(model_name, evaluation.version, {EVAL_TAG_PREFIX + env: evaluation.to_tag()})


def promote(
    *,
    model_name: str,
    env: str,
    seeds: Sequence[int],
    margin_se: float,
    max_tokens_per_episode: float,
    evaluate: Callable[[str], Evaluation] | None = None,
) -> Decision:
    """Run the gate against the registry: read `challenger` and `champion`, get their held-out
    evaluations (stored on the versions, else from `evaluate(version)` when given, which is then
    stored), decide, tag both versions with the decision and move the aliases if promoted.

    Raises PromotionError (registry untouched) when there is no challenger or a version has no
    evaluation on `seeds` and no `evaluate` callback was given."""
    from dynaplan import tracking

    seeds = [int(s) for s in seeds]
    candidate_version = tracking.version_for_alias(model_name, CHALLENGER)
    if candidate_version is None:
        raise NoCandidate(
            f"no version of {model_name} has the alias '{CHALLENGER}'; set it on the version to "
            f"consider (MlflowClient().set_registered_model_alias('{model_name}', '{CHALLENGER}', <version>))"
        )
    champion_version = tracking.version_for_alias(model_name, CHAMPION)

    def evaluation_of(version: str, role: str) -> Evaluation:
        found = stored_evaluation(model_name, version, env, seeds)
        if found is not None:
            return found
        if evaluate is None:
            raise PromotionError(unevaluated_message(model_name, version, role, seeds, env))
        fresh = evaluate(version)
        if fresh.on_seeds(seeds) is None:
            raise PromotionError(unevaluated_message(model_name, version, role, seeds, env))
        record_evaluation(model_name, fresh, env)
        return fresh

    candidate = evaluation_of(candidate_version, "candidate")
    champion = evaluation_of(champion_version, "champion") if champion_version else None
    decision = decide(
        candidate, champion, model_name=model_name, seeds=seeds,
        margin_se=margin_se, max_tokens_per_episode=max_tokens_per_episode,
    )
    summary = json.dumps(decision.summary(), separators=(",", ":"))
    tags = {DECISION_TAG: summary, OUTCOME_TAG: decision.outcome}
    tracking.set_version_tags(model_name, candidate_version, tags)
    if champion_version and champion_version != candidate_version:
        tracking.set_version_tags(model_name, champion_version, tags)
    if decision.promoted:
        tracking.set_alias(model_name, CHAMPION, candidate_version)
        # The challenger has become the champion: clearing the alias means a rerun of the gate
        # does not compare a version with itself, and the next candidate is set explicitly.
        tracking.delete_alias(model_name, CHALLENGER)
    return decision


RECORD_PATH = "reports/promote/decision.json"


def evaluate_with_runner(params: Any, version: str) -> Evaluation:
    """Evaluate a registered version on the promotion's held-out seeds with the evaluation
    runner (same seeds, policy settings and resume store as `dynaplan evaluate`)."""
    from dynaplan.eval.runner import evaluate as run_eval
    from dynaplan.eval.runner import spec_from_params

    gate = params.promote
    spec = spec_from_params(
        params, name=f"promote-{gate.model_name}-v{version}-{gate.env}", policy="model", env=gate.env,
        model=f"models:/{gate.model_name}/{version}", episodes=gate.episodes,
    )
    result, _ = run_eval(spec, out_dir=f"reports/promote/eval/{spec.name}")
    return Evaluation.from_episodes(version, [ep for ep in result.episodes if ep["attempt"] == 0])


def run_gate(params: Any, record_path: str | Path = RECORD_PATH) -> Decision | None:
    """The promote stage and `dynaplan promote`: the gate over the params' `promote` section on
    seeds `seeds.eval_start ..`, then the decision record written atomically as JSON. With no
    challenger the record says so and None is returned; other refusals raise PromotionError."""
    gate = params.promote
    seeds = list(range(params.seeds.eval_start, params.seeds.eval_start + gate.episodes))
    evaluate = (lambda version: evaluate_with_runner(params, version)) if gate.evaluate_missing else None
    try:
        decision = promote(
            model_name=gate.model_name, env=gate.env, seeds=seeds, margin_se=gate.margin_se,
            max_tokens_per_episode=gate.max_tokens_per_episode, evaluate=evaluate,
        )
        record = decision.record()
    except NoCandidate as err:
        decision, record = None, {"outcome": "no_candidate", "promoted": False, "model_name": gate.model_name,
                                  "reason": str(err), "seeds": seeds}
    path = Path(record_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return decision
