"""The lockstep engine: seed order, determinism across batch sizes, caps, and a real tiny model."""

from __future__ import annotations

from dynaplan.agent.policy import LLMPolicy, RandomPolicy
from dynaplan.envs.crafter_text import ACTION_NAMES, CrafterTextEnv
from dynaplan.models.base import SamplingParams
from dynaplan.train.rollout import run_episodes


def _actions(episodes):
    return [[s.decision.action for s in e.steps] for e in episodes]


def test_random_episodes_come_back_in_seed_order_and_do_not_depend_on_num_envs():
    seeds = [5, 3, 9]
    one = run_episodes(RandomPolicy(ACTION_NAMES, seed=0), "crafter", {}, seeds, num_envs=1, max_steps=12, progress=False)
    three = run_episodes(RandomPolicy(ACTION_NAMES, seed=0), "crafter", {}, seeds, num_envs=3, max_steps=12, progress=False)
    assert [e.seed for e in one] == seeds
    assert _actions(one) == _actions(three)
    assert [e.final_info["local_view"] for e in one] == [e.final_info["local_view"] for e in three]
    assert all(e.length == 12 and e.truncated and e.steps[-1].truncated for e in one)
    assert not any(s.truncated for s in one[0].steps[:-1])


def test_streaming_callbacks_without_keeping_steps():
    seen, done = [], []
    episodes = run_episodes(
        RandomPolicy(ACTION_NAMES), "crafter", {}, [0, 1], num_envs=2, max_steps=4, keep_steps=False,
        on_step=lambda seed, step: seen.append((seed, step.step)), on_episode=done.append, progress=False,
    )
    assert sorted(seen) == [(s, t) for s in (0, 1) for t in range(4)]
    assert [e.steps for e in episodes] == [[], []] and len(done) == 2


def test_llm_policy_with_the_tiny_model_keeps_exact_tokens(tiny_model_dir):
    from dynaplan.models.hf import HFBackend

    backend = HFBackend(tiny_model_dir)
    env = CrafterTextEnv()
    policy = LLMPolicy(
        backend, action_names=env.action_names, default_action=env.default_action, rules=env.rules,
        mode="every_k", k=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=8), seed=3,
    )
    episodes = run_episodes(policy, "crafter", {}, [11, 12], num_envs=2, max_steps=3, progress=False)
    for episode in episodes:
        for step in episode.steps:
            gen = step.decision.generation
            assert len(gen.token_ids) == len(gen.logprobs) <= 8
            assert step.decision.action in env.action_names
            # every-k: the forced opening is part of the answer on steps 0 and 2 only
            assert step.decision.text.startswith("<plan>") == (step.step % 2 == 0)
