"""The promotion gate: the pure rule on hand-made per-seed numbers, and `promote()` against a real
MLflow model registry on SQLite in a temporary folder (aliases, tags, the JSON record)."""

from __future__ import annotations

import json
import math

import pytest

from dynaplan import promotion
from dynaplan.promotion import CHALLENGER, CHAMPION, Evaluation, PromotionError, decide, paired_difference

SEEDS = [1000, 1001, 1002, 1003]
NAME = "dynaplan-agent"


def ev(version: str, progression, tokens=(100, 100, 100, 100), seeds=SEEDS) -> Evaluation:
    return Evaluation(version, tuple(seeds), tuple(float(p) for p in progression), tuple(float(t) for t in tokens))


def gate(candidate, champion, margin_se=1.0, budget=1000.0):
    return decide(candidate, champion, model_name=NAME, seeds=SEEDS, margin_se=margin_se, max_tokens_per_episode=budget)


def test_paired_standard_error_matches_hand_computation():
    mean_diff, se = paired_difference([0.3, 0.5, 0.4, 0.6], [0.1, 0.2, 0.3, 0.2])
    # diffs 0.2 0.3 0.1 0.4: mean 0.25, sample var 0.016667, se sqrt(var/4) = 0.06455
    assert mean_diff == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt((0.0025 + 0.0025 + 0.0225 + 0.0225) / 3 / 4))


def test_clearly_better_candidate_is_promoted():
    decision = gate(ev("2", [0.3, 0.5, 0.4, 0.6]), ev("1", [0.1, 0.2, 0.3, 0.2]))
    assert decision.promoted and decision.outcome == "promoted"
    assert decision.mean_difference > decision.threshold


def test_tied_candidate_is_not_promoted():
    same = [0.2, 0.4, 0.1, 0.3]
    decision = gate(ev("2", same), ev("1", same), margin_se=0.0)
    assert not decision.promoted and decision.outcome == "kept"
    assert decision.mean_difference == 0.0


def test_worse_candidate_is_not_promoted_even_with_zero_margin():
    decision = gate(ev("2", [0.1, 0.1, 0.2, 0.1]), ev("1", [0.2, 0.3, 0.2, 0.4]), margin_se=0.0)
    assert not decision.promoted


def test_gain_within_the_margin_is_not_promoted():
    # mean gain 0.05 with a paired SE of about 0.087: not beyond 1 SE
    decision = gate(ev("2", [0.4, 0.1, 0.4, 0.1]), ev("1", [0.2, 0.2, 0.2, 0.2]), margin_se=1.0)
    assert decision.mean_difference == pytest.approx(0.05)
    assert not decision.promoted


def test_better_candidate_over_token_budget_is_not_promoted():
    decision = gate(ev("2", [0.3, 0.5, 0.4, 0.6], tokens=[5000] * 4), ev("1", [0.1, 0.2, 0.3, 0.2]), budget=1000)
    assert not decision.promoted and not decision.within_token_budget
    assert "budget" in decision.reason


def test_first_evaluated_candidate_becomes_champion():
    decision = gate(ev("1", [0.1, 0.2, 0.3, 0.2]), None)
    assert decision.promoted and decision.outcome == "first_champion"


def test_evaluation_on_other_seeds_is_refused():
    with pytest.raises(PromotionError, match="lacks some of the seeds"):
        gate(ev("2", [0.3, 0.5, 0.4, 0.6], seeds=[1, 2, 3, 4]), None)


# --- against a real registry -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory):
    """One SQLite store per module: creating its tables takes seconds, a model takes milliseconds."""
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("DYNAPLAN_ROOT", str(root))
        mlflow.set_tracking_uri(uri)
        yield mlflow.MlflowClient(), root


@pytest.fixture()
def registry(tracking_store):
    """A fresh registered model with three versions and no aliases."""
    client, root = tracking_store
    try:
        client.delete_registered_model(NAME)
    except Exception:  # absent in the first test
        pass
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=(root / "adapter").as_uri())
    return client


def store(version: str, progression, tokens=(100, 100, 100, 100)):
    promotion.record_evaluation(NAME, ev(version, progression, tokens), env="pogs")


def run_gate(**kwargs):
    args = dict(model_name=NAME, env="pogs", seeds=SEEDS, margin_se=1.0, max_tokens_per_episode=1000.0)
    args.update(kwargs)
    return promotion.promote(**args)


def test_registry_first_candidate_becomes_champion_and_is_tagged(registry):
    store("1", [0.1, 0.2, 0.3, 0.2])
    registry.set_registered_model_alias(NAME, CHALLENGER, "1")
    decision = run_gate()
    assert decision.outcome == "first_champion"
    assert str(registry.get_model_version_by_alias(NAME, CHAMPION).version) == "1"
    tags = registry.get_model_version(NAME, "1").tags
    assert tags[promotion.OUTCOME_TAG] == "first_champion"
    assert json.loads(tags[promotion.DECISION_TAG])["candidate_progression"] == pytest.approx(0.2)


def test_registry_better_challenger_replaces_champion_and_both_are_tagged(registry):
    store("1", [0.1, 0.2, 0.3, 0.2])
    store("2", [0.3, 0.5, 0.4, 0.6], tokens=[200, 220, 180, 200])
    registry.set_registered_model_alias(NAME, CHAMPION, "1")
    registry.set_registered_model_alias(NAME, CHALLENGER, "2")
    decision = run_gate()
    assert decision.promoted
    assert str(registry.get_model_version_by_alias(NAME, CHAMPION).version) == "2"
    # the challenger alias is cleared so a rerun does not compare the champion with itself
    assert "challenger" not in registry.get_registered_model(NAME).aliases
    for version in ("1", "2"):
        recorded = json.loads(registry.get_model_version(NAME, version).tags[promotion.DECISION_TAG])
        assert recorded["candidate_version"] == "2" and recorded["champion_version"] == "1"
        assert recorded["mean_difference"] == pytest.approx(0.25)
        assert recorded["candidate_tokens_per_episode"] == pytest.approx(200)


@pytest.mark.parametrize("challenger_scores", [[0.1, 0.2, 0.3, 0.2], [0.0, 0.1, 0.2, 0.1]], ids=["tied", "worse"])
def test_registry_tied_or_worse_challenger_changes_no_alias(registry, challenger_scores):
    store("1", [0.1, 0.2, 0.3, 0.2])
    store("2", challenger_scores)
    registry.set_registered_model_alias(NAME, CHAMPION, "1")
    registry.set_registered_model_alias(NAME, CHALLENGER, "2")
    decision = run_gate(margin_se=0.0)
    assert not decision.promoted
    aliases = {k: str(v) for k, v in registry.get_registered_model(NAME).aliases.items()}
    assert aliases == {CHAMPION: "1", CHALLENGER: "2"}
    assert registry.get_model_version(NAME, "2").tags[promotion.OUTCOME_TAG] == "kept"


def test_registry_unevaluated_challenger_is_refused_with_a_clear_message(registry):
    store("1", [0.1, 0.2, 0.3, 0.2])
    registry.set_registered_model_alias(NAME, CHAMPION, "1")
    registry.set_registered_model_alias(NAME, CHALLENGER, "3")
    with pytest.raises(PromotionError, match=r"candidate version 3 of dynaplan-agent has no evaluation on the 4 held-out pogs seeds 1000\.\.1003"):
        run_gate()
    assert str(registry.get_model_version_by_alias(NAME, CHAMPION).version) == "1"
    assert promotion.OUTCOME_TAG not in registry.get_model_version(NAME, "3").tags


def test_registry_evaluation_callback_fills_in_and_is_stored(registry):
    registry.set_registered_model_alias(NAME, CHALLENGER, "2")
    calls = []

    def evaluate(version):
        calls.append(version)
        return ev(version, [0.5, 0.5, 0.5, 0.5])

    run_gate(evaluate=evaluate)
    assert calls == ["2"]
    assert promotion.stored_evaluation(NAME, "2", "pogs", SEEDS).mean_progression == pytest.approx(0.5)


def test_registry_without_challenger_alias_is_refused(registry):
    with pytest.raises(PromotionError, match="alias 'challenger'"):
        run_gate()


def test_run_gate_writes_the_record_with_the_numbers(registry, tmp_path):
    from dynaplan.config import parse_params

    params = parse_params({"seeds": {"eval_start": 1000}, "promote": {"episodes": 4, "evaluate_missing": False, "env": "pogs"}})
    store("1", [0.1, 0.2, 0.3, 0.2])
    store("2", [0.3, 0.5, 0.4, 0.6], tokens=[200, 220, 180, 200])
    registry.set_registered_model_alias(NAME, CHAMPION, "1")
    registry.set_registered_model_alias(NAME, CHALLENGER, "2")
    record_path = tmp_path / "decision.json"
    decision = promotion.run_gate(params, record_path)
    record = json.loads(record_path.read_text())
    assert decision.promoted and record["outcome"] == "promoted"
    assert record["seeds"] == SEEDS
    assert record["candidate_per_seed"] == [0.3, 0.5, 0.4, 0.6] and record["champion_per_seed"] == [0.1, 0.2, 0.3, 0.2]
    assert record["mean_difference"] == pytest.approx(0.25) and record["paired_se"] == pytest.approx(0.0645497, rel=1e-5)
    assert record["candidate_tokens_per_episode"] == pytest.approx(200) and record["max_tokens_per_episode"] == 20000


def test_run_gate_without_challenger_records_no_candidate(registry, tmp_path):
    from dynaplan.config import parse_params

    params = parse_params({"promote": {"evaluate_missing": False}})
    assert promotion.run_gate(params, tmp_path / "d.json") is None
    assert json.loads((tmp_path / "d.json").read_text())["outcome"] == "no_candidate"
