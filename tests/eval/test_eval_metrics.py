"""Evaluation metrics against hand-worked numbers."""

import math

import crafter
import pytest

from dynaplan.eval import metrics


def _episode(seed=1, length=40, plan_steps=(), plan_tokens=5, fallbacks=(), achievements=None,
             progression=0.0, reward=0.0, attempt=0, new_tokens=2):
    steps = []
    for t in range(length):
        planned = t in plan_steps
        steps.append({
            "step": t, "action": "Noop", "valid": t not in fallbacks, "fallback": t in fallbacks,
            "planned": planned, "plan_text": "go to the tree" if planned else None,
            "plan_tokens": plan_tokens if planned else 0,
            "new_tokens": new_tokens + (plan_tokens if planned else 0), "reward": 0.0,
        })
    return {"env": "crafter", "seed": seed, "attempt": attempt, "episode_id": f"e{seed}-{attempt}",
            "length": length, "reward": reward, "progression": progression,
            "achievements": achievements or {}, "steps": steps}


def test_achievement_list_matches_crafter():
    assert metrics.CRAFTER_ACHIEVEMENTS == tuple(crafter.constants.achievements)
    assert len(metrics.CRAFTER_ACHIEVEMENTS) == 22


def test_crafter_score_hand_worked():
    assert metrics.crafter_score([0.0] * 22) == pytest.approx(0.0)
    assert metrics.crafter_score([100.0] * 22) == pytest.approx(100.0)
    # exp((ln 1 + ln 4) / 2) - 1 = 2 - 1 = 1;  exp((ln 9 + ln 1) / 2) - 1 = 3 - 1 = 2
    assert metrics.crafter_score([0.0, 3.0]) == pytest.approx(1.0)
    assert metrics.crafter_score([8.0, 0.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        metrics.crafter_score([101.0])


def test_standard_error_hand_worked():
    # values 1, 2, 3: sample variance 1, SE = sqrt(1/3)
    assert metrics.standard_error([1.0, 2.0, 3.0]) == pytest.approx(math.sqrt(1 / 3))
    assert metrics.standard_error([5.0]) == 0.0


def test_plans_replaced_within_15_counts_only_close_successors():
    # 0->10 (10 steps: replaced), 10->30 (20: kept), 30->32 (replaced), 32 is the last plan
    assert metrics.plans_replaced_within([0, 10, 30, 32]) == 2
    assert metrics.plans_replaced_within([0, 15]) == 1
    assert metrics.plans_replaced_within([0, 16]) == 0
    assert metrics.plans_replaced_within([]) == 0


def test_episode_metrics_hand_worked():
    ep = _episode(length=40, plan_steps={0, 10, 30, 32}, plan_tokens=5, fallbacks={3, 4},
                  achievements={"collect_wood": 7, "place_table": 20}, progression=2 / 22, reward=2.1)
    m = metrics.episode_metrics(ep)
    assert m["length"] == 40 and m["plans"] == 4
    assert m["plan_rate"] == pytest.approx(0.1)
    assert m["plan_tokens"] == 20
    assert m["generated_tokens"] == 40 * 2 + 20
    assert m["mean_plan_tokens"] == 5 and m["mean_plan_chars"] == len("go to the tree")
    assert m["plan_replaced_within_15"] == pytest.approx(0.5)
    assert m["invalid_rate"] == pytest.approx(2 / 40) and m["valid_rate"] == pytest.approx(38 / 40)
    assert m["num_achievements"] == 2 and m["first_unlock"] == {"collect_wood": 7, "place_table": 20}


def test_episode_without_plans_has_no_plan_means():
    m = metrics.episode_metrics(_episode(length=5))
    assert m["plans"] == 0 and m["mean_plan_tokens"] is None and m["plan_replaced_within_15"] is None


def test_aggregate_hand_worked():
    a = _episode(seed=1, length=10, plan_steps={0, 5}, plan_tokens=4, achievements={"collect_wood": 3},
                 progression=1 / 22)
    b = _episode(seed=2, length=30, plan_steps={0, 20}, plan_tokens=10,
                 achievements={"collect_wood": 9, "collect_sapling": 2, "place_plant": 4}, progression=3 / 22)
    agg = metrics.aggregate([a, b], "crafter")
    assert agg["episodes"] == 2
    assert agg["progression"] == pytest.approx(2 / 22)
    # |1/22 - 3/22| / 2 is the SE of two values
    assert agg["progression_se"] == pytest.approx(1 / 22)
    assert agg["length"] == 20 and agg["plans"] == 2
    # pooled: (8 + 20) tokens over 4 plans; 0->5 replaced, 0->20 not: 1 of 4
    assert agg["mean_plan_tokens"] == pytest.approx(7.0)
    assert agg["plan_replaced_within_15"] == pytest.approx(0.25)
    assert agg["plan_follow_through"] == pytest.approx(0.75)
    assert agg["success_rates"]["collect_wood"] == 100.0
    assert agg["success_rates"]["collect_sapling"] == 50.0
    assert agg["success_rates"]["collect_diamond"] == 0.0
    assert agg["first_unlock_mean"]["collect_wood"] == pytest.approx(6.0)
    # two achievements at 50%, one at 100%, 19 at 0: exp((2 ln 51 + ln 101) / 22) - 1
    expected = math.exp((2 * math.log(51) + math.log(101)) / 22) - 1
    assert agg["crafter_score"] == pytest.approx(expected)
    assert agg["crafter_score_se"] > 0


def test_best_of_n_takes_union_of_achievements_and_best_episode():
    eps = [
        _episode(seed=1, attempt=0, achievements={"collect_wood": 3}, progression=1 / 22),
        _episode(seed=1, attempt=1, achievements={"collect_sapling": 2, "place_plant": 5}, progression=2 / 22),
        _episode(seed=2, attempt=0, achievements={}, progression=0.0),
        _episode(seed=2, attempt=1, achievements={"collect_drink": 8}, progression=1 / 22),
    ]
    best = metrics.best_of_n(eps, "crafter")
    assert best["n"] == 2 and best["seeds"] == 2
    assert best["progression"] == pytest.approx((2 / 22 + 1 / 22) / 2)
    assert best["success_rates"]["collect_wood"] == 50.0
    assert best["success_rates"]["place_plant"] == 50.0
    assert best["success_rates"]["collect_drink"] == 50.0
    assert best["best_episode"]["seed"] == 1 and best["best_episode"]["attempt"] == 1
