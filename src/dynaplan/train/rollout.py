"""The lockstep rollout engine: many text envs stepped together, one batched policy call per step.

Evaluation, data generation and PPO all run episodes through `run_episodes`; it keeps each
decision (with its exact tokens and log-probs for LLM policies), reward and done flags, and
returns episodes in the order of the seeds it was given. It must not score, log or write files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dynaplan.agent.policy import Decision, Policy
from dynaplan.envs import make_env


@dataclass
class StepResult:
    step: int
    observation: str  # what the decision was made on
    decision: Decision
    reward: float
    terminated: bool
    truncated: bool  # the env's own cap, or the run's max_steps
    info: dict  # the info returned by the step


@dataclass
class EpisodeResult:
    seed: int
    steps: list[StepResult] = field(default_factory=list)
    reset_info: dict = field(default_factory=dict)
    final_info: dict = field(default_factory=dict)
    total_reward: float = 0.0
    length: int = 0
    terminated: bool = False
    truncated: bool = False


def run_episodes(
    policy: Policy,
    env_name: str,
    env_kwargs: dict,
    seeds: Sequence[int],
    *,
    num_envs: int = 1,
    max_steps: int | None = None,
    keep_steps: bool = True,
    on_step: Callable[[int, StepResult], None] | None = None,
    on_episode: Callable[[EpisodeResult], None] | None = None,
    progress: bool = True,
    description: str = "episodes",
) -> list[EpisodeResult]:
    """Play one episode per seed with up to `num_envs` envs in lockstep.

    `max_steps` caps episodes below the env's own cap (the last step is then `truncated`).
    `keep_steps=False` drops per-step results after `on_step` saw them (long expert runs).
    `on_step(seed, step_result)` and `on_episode(episode)` stream results as they happen.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    seeds = [int(s) for s in seeds]
    num_slots = min(num_envs, len(seeds))
    envs = [make_env(env_name, **env_kwargs) for _ in range(num_slots)]
    policy.reset(num_slots)
    results: dict[int, EpisodeResult] = {}
    pending = list(enumerate(seeds))[::-1]  # a stack: pop() gives seeds in order
    current: list[tuple[int, EpisodeResult] | None] = [None] * num_slots
    observations: list[str] = [""] * num_slots
    infos: list[dict] = [{}] * num_slots

    def start(slot: int) -> None:
        index, seed = pending.pop()
        obs, info = envs[slot].reset(seed=seed)
        current[slot] = (index, EpisodeResult(seed=seed, reset_info=info, final_info=info))
        observations[slot], infos[slot] = obs, info
        policy.start_episode(slot, seed, obs, info)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task(description, total=len(seeds))
        for slot in range(num_slots):
            start(slot)
        while any(c is not None for c in current):
            active = [s for s in range(num_slots) if current[s] is not None]
            decisions = policy.act(active, [observations[s] for s in active], [infos[s] for s in active])
            for slot, decision in zip(active, decisions):
                index, episode = current[slot]
                obs, reward, terminated, truncated, info = envs[slot].step(decision.action)
                capped = max_steps is not None and episode.length + 1 >= max_steps
                result = StepResult(
                    step=episode.length,
                    observation=observations[slot],
                    decision=decision,
                    reward=float(reward),
                    terminated=bool(terminated),
                    truncated=bool(truncated or (capped and not terminated)),
                    info=info,
                )
                if on_step is not None:
                    on_step(episode.seed, result)
                if keep_steps:
                    episode.steps.append(result)
                episode.total_reward += result.reward
                episode.length += 1
                episode.final_info = info
                observations[slot], infos[slot] = obs, info
                if result.terminated or result.truncated:
                    episode.terminated, episode.truncated = result.terminated, result.truncated
                    results[index] = episode
                    if on_episode is not None:
                        on_episode(episode)
                    bar.advance(task)
                    current[slot] = None
                    if pending:
                        start(slot)
    for env in envs:
        env.close()
    return [results[i] for i in range(len(seeds))]
