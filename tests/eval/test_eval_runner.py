"""The evaluation runner: crafter agreement, robustness to garbage answers, resuming, outputs."""

import json

import pytest

from dynaplan.eval import metrics as M
from dynaplan.eval.runner import EpisodeStore, EvalSpec, evaluate, fingerprint, run_evaluation
from dynaplan.models.base import Generation

GARBAGE = [
    "",  # empty
    "Do " * 400,  # endless (cut at max_new_tokens)
    "<plan>go to the tree",  # unclosed tag
    "<action>Do</action>",  # wrong tags
    "Bewege dich nach Westen und sammle Holz.",  # another language
    "<plan>a</plan>\n<plan>b</plan>\nNoop",  # two plan blocks
    "\x00\ufffd\u202e",  # control and replacement characters
    "<plan>\nfind water\n</plan>\nMove West",  # a valid answer among the garbage
]


class GarbageBackend:
    """Cycles through malformed answers; fails with ConnectionError after `fail_after` calls.

    A fake on purpose: this tests robustness to model *output*, which a real tiny model cannot
    be made to produce on demand."""

    name = "garbage"

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, requests, sampling, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise ConnectionError("server went away")
        out = []
        for i, request in enumerate(requests):
            text = request.prefix + GARBAGE[(self.calls + i) % len(GARBAGE)]
            out.append(Generation(text=text, token_ids=list(range(len(text.split()))), logprobs=[0.0] * len(text.split()),
                                  prompt_token_ids=[1, 2, 3], finish_reason="length" if len(text) > 500 else "stop"))
        self.calls += 1
        return out


def _spec(**kw):
    base = dict(name="t", env="crafter", policy="model", model="unused", episodes=2, num_envs=2, max_steps=8,
                env_kwargs={"max_steps": 2000, "area": 64})
    base.update(kw)
    return EvalSpec(**base)


def test_garbage_answers_on_pogs_fall_back_to_staying_put(tmp_path):
    spec = _spec(env="pogs", env_kwargs={"num_nodes": 10, "max_steps": 30}, max_steps=None)
    result = run_evaluation(spec, tmp_path / "store.jsonl", backend=GarbageBackend(), progress=False)
    steps = [s for ep in result.episodes for s in ep["steps"]]
    assert len(steps) == 60  # nothing valid reaches the target: both episodes run to the cap
    assert all(s["fallback"] and s["reward"] == -1.0 for s in steps)
    assert result.metrics["invalid_rate"] == 1.0


def test_garbage_answers_never_crash_and_are_counted(tmp_path):
    result = run_evaluation(_spec(), tmp_path / "store.jsonl", backend=GarbageBackend(), progress=False)
    assert [ep["length"] for ep in result.episodes] == [8, 8]
    steps = [s for ep in result.episodes for s in ep["steps"]]
    # only "Move West" from the valid answer, and "Do" recovered leniently from "Do Do Do ..."
    assert {s["action"] for s in steps if not s["fallback"]} <= {"Move West", "Do"}
    assert all(s["action"] == "Noop" for s in steps if s["fallback"])
    fallbacks = sum(s["fallback"] for s in steps)
    assert fallbacks >= 10
    m = result.metrics
    assert m["invalid_rate"] == pytest.approx(fallbacks / 16)
    assert m["valid_rate"] == pytest.approx(sum(s["valid"] for s in steps) / 16)
    assert 0 < m["valid_rate"] < 1


def test_interrupted_evaluation_resumes_from_finished_episodes(tmp_path):
    store = tmp_path / "store.jsonl"
    spec = _spec(episodes=3, num_envs=1, max_steps=4)
    # 4 steps per episode, one env: episode 1 finishes after call 4, the crash comes at call 6
    with pytest.raises(ConnectionError):
        run_evaluation(spec, store, backend=GarbageBackend(fail_after=6), progress=False)
    assert [ep["seed"] for ep in EpisodeStore(store).load()] == [spec.seed_start]
    with store.open("ab") as f:  # a torn line from a crash mid-write is dropped, not fatal
        f.write(b'{"attempt": 0, "seed": 12')
    result = run_evaluation(spec, store, backend=GarbageBackend(), progress=False)
    assert (result.resumed, result.played) == (1, 2)
    assert [ep["seed"] for ep in result.episodes] == spec.seeds
    assert len(EpisodeStore(store).load()) == 3
    again = run_evaluation(spec, store, backend=GarbageBackend(fail_after=0), progress=False)
    assert (again.resumed, again.played) == (3, 0)


def test_fingerprint_ignores_episode_count_but_not_the_policy():
    assert fingerprint(_spec(episodes=2)) == fingerprint(_spec(episodes=50, num_envs=7))
    assert fingerprint(_spec()) != fingerprint(_spec(mode="never"))
    assert fingerprint(_spec()) != fingerprint(_spec(max_steps=9))


def test_progression_and_success_rates_agree_with_crafter(tmp_path):
    spec = EvalSpec(name="r", env="crafter", policy="random", episodes=3, num_envs=3, max_steps=120,
                    env_kwargs={"max_steps": 2000, "area": 64})
    result, paths = evaluate(spec, tmp_path / "out", tmp_path / "resume", track=False, progress=False)
    episodes = result.episodes
    for ep in episodes:
        unlocked = {name for name, count in ep["crafter_achievements"].items() if count > 0}
        assert set(ep["achievements"]) == unlocked
        assert ep["progression"] == pytest.approx(len(unlocked) / 22)
    expected_rates = {
        name: 100.0 * sum(ep["crafter_achievements"][name] > 0 for ep in episodes) / len(episodes)
        for name in M.CRAFTER_ACHIEVEMENTS
    }
    m = json.loads(paths["metrics"].read_text())
    assert m["success_rates"] == pytest.approx(expected_rates)
    assert m["progression"] == pytest.approx(
        sum(sum(c > 0 for c in ep["crafter_achievements"].values()) for ep in episodes) / (22 * len(episodes))
    )
    assert m["crafter_score"] == pytest.approx(M.crafter_score(expected_rates.values()))
    lines = paths["steps"].read_text().splitlines()
    assert len(lines) == sum(ep["length"] for ep in episodes)
    assert paths["curve"].read_text().startswith("step,progression,plans,generated_tokens,running")
    assert (paths["plots"] / "curve.png").stat().st_size > 0
    assert len(paths["episodes"].read_text().splitlines()) == 1 + len(episodes)


def test_best_of_n_runs_distinct_attempts(tmp_path):
    spec = EvalSpec(name="b", env="crafter", policy="random", episodes=2, best_of=2, num_envs=4, max_steps=25,
                    env_kwargs={"max_steps": 2000, "area": 64})
    result = run_evaluation(spec, tmp_path / "s.jsonl", progress=False)
    assert sorted((ep["attempt"], ep["seed"]) for ep in result.episodes) == [
        (a, s) for a in range(2) for s in spec.seeds
    ]
    first = [s["action"] for s in result.episodes[0]["steps"]]
    second = [s["action"] for s in result.episodes[2]["steps"]]
    assert result.episodes[0]["seed"] == result.episodes[2]["seed"] and first != second
    best = result.metrics["best_of"]
    assert best["n"] == 2 and best["seeds"] == 2
    assert best["progression"] >= result.metrics["progression"]
