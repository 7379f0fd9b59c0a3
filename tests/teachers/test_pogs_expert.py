"""PogsExpert: success on hard episodes, plans at seeded random intervals, truthful and varied
plans, and only observation-level knowledge."""

from __future__ import annotations

import re

import pytest

from dynaplan.envs.pogs import PogsEnv
from dynaplan.teachers import TeacherStep, make_teacher
from dynaplan.teachers.pogs_expert import PLAN_STYLES, PogsExpert


def play(seed: int, teacher: PogsExpert, env: PogsEnv) -> tuple[bool, list[TeacherStep], list[dict]]:
    obs, info = env.reset(seed=seed)
    teacher.reset(obs, info)
    steps, infos = [], [info]
    while True:
        step = teacher.act(obs, info)
        steps.append(step)
        obs, reward, terminated, truncated, info = env.step(step.action)
        infos.append(info)
        if terminated or truncated:
            return terminated, steps, infos


def test_expert_reaches_the_target_in_at_least_95_percent_of_hard_episodes():
    env, teacher = PogsEnv(), make_teacher("pogs", seed=0)
    reached = [play(seed, teacher, env)[0] for seed in range(40)]
    assert sum(reached) >= 38


def test_expert_never_makes_an_invalid_move():
    env, teacher = PogsEnv(), PogsExpert(seed=1)
    for seed in range(10):
        _, steps, infos = play(seed, teacher, env)
        for step, info in zip(steps, infos):
            assert int(step.action) in info["neighbors"]


def test_plans_come_at_intervals_drawn_from_the_configured_range():
    env, teacher = PogsEnv(max_steps=30), PogsExpert(seed=2, plan_interval_min=2, plan_interval_max=4)
    _, steps, _ = play(0, teacher, env)
    assert steps[0].plan is not None  # each episode opens with a plan
    planned = [i for i, step in enumerate(steps) if step.plan is not None]
    for here, nxt in zip(planned, planned[1:]):
        assert nxt - here == steps[here].plan_interval and 2 <= steps[here].plan_interval <= 4
    assert all(step.plan_interval is None for step in steps if step.plan is None)


def test_same_seed_gives_the_same_actions_and_plans():
    runs = [play(5, PogsExpert(seed=9), PogsEnv())[1] for _ in range(2)]
    assert runs[0] == runs[1]


def test_plans_are_truthful_about_the_next_move_and_the_target():
    env, teacher = PogsEnv(), PogsExpert(seed=3, plan_interval_min=1, plan_interval_max=1)
    for seed in range(8):
        obs, info = env.reset(seed=seed)
        teacher.reset(obs, info)
        while True:
            step = teacher.act(obs, info)
            numbers = {int(n) for n in re.findall(r"\d+", re.sub(r"\d+ moves?\b", "", step.plan))}
            known = set(teacher.explorer.known.nodes)
            assert int(step.action) in numbers  # the plan names the node it moves to now
            assert numbers <= known | {info["target_node"]}  # and only nodes it has seen
            if info["target_node"] in known:  # once the target is on its map, it says so
                assert info["target_node"] in numbers
            obs, _, terminated, truncated, info = env.step(step.action)
            if terminated or truncated:
                break


def test_at_least_16_plan_styles_and_many_distinct_wordings_appear():
    assert len(PLAN_STYLES) >= 16 and len({style for style in PLAN_STYLES}) == len(PLAN_STYLES)
    for style in PLAN_STYLES:  # every wording names the move it is about to make
        assert all("{next}" in template or "{route}" in template for template in style)
    env, teacher = PogsEnv(), PogsExpert(seed=4, plan_interval_min=1, plan_interval_max=2)
    openings = set()
    for seed in range(30):
        for step in play(seed, teacher, env)[1]:
            if step.plan:
                openings.add(re.sub(r"\d+", "N", step.plan)[:25])
    assert len(openings) >= 16


@pytest.mark.parametrize("bad", [{"plan_interval_min": 0}, {"plan_interval_min": 5, "plan_interval_max": 4}, {"k": 0}])
def test_bad_settings_raise_value_error(bad):
    with pytest.raises(ValueError):
        PogsExpert(seed=0, **bad)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_expert_reads_the_radius_off_the_observations(k):
    env = PogsEnv(k=k)
    inferred, told = PogsExpert(seed=0), PogsExpert(seed=0, k=k)
    for seed in range(5):
        assert play(seed, inferred, env)[1] == play(seed, told, env)[1]
        assert inferred.explorer.k == k
