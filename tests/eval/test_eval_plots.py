"""Goldilocks and Pareto rows and plots from evaluation metrics."""

import json
import math

from dynaplan.eval import plots


def _m(progression, tokens, **config):
    return {"progression": progression, "progression_se": 0.01, "generated_tokens": tokens,
            "generated_tokens_se": 1.0, "plan_tokens": tokens / 2, "plan_rate": 0.1,
            "config": {"env": "crafter", **config}}


def test_goldilocks_rows_order_fixed_intervals_then_never_then_dynamic():
    evaluations = {
        "goldilocks-dynamic": _m(0.1, 50, mode="dynamic"),
        "goldilocks-never": _m(0.05, 10, mode="never"),
        "goldilocks-every-16": _m(0.08, 30, mode="every_k", k=16),
        "goldilocks-every-2": _m(0.09, 200, mode="every_k", k=2),
        "goldilocks-every-4": _m(0.12, 100, mode="every_k", k=4),
    }
    rows = plots.goldilocks_rows(evaluations)
    assert [r["label"] for r in rows] == ["every 2", "every 4", "every 16", "never", "dynamic"]
    assert rows[1]["progression"] == 0.12 and rows[1]["tokens_per_episode"] == 100
    assert math.isinf(rows[3]["interval"]) and math.isnan(rows[4]["interval"])


def test_pareto_front_keeps_only_undominated_agents(tmp_path):
    evaluations = {
        "cheap": _m(0.10, 10),
        "dominated": _m(0.09, 50),  # less progression for more tokens than "cheap"
        "best": _m(0.40, 1000),
        "pogs-agent": {**_m(0.01, 5000), "config": {"env": "pogs"}},  # another env: its own front
    }
    rows = {r["name"]: r for r in plots.pareto_rows(evaluations)}
    assert rows["cheap"]["pareto"] and rows["best"]["pareto"] and rows["pogs-agent"]["pareto"]
    assert not rows["dominated"]["pareto"]
    png = plots.pareto_plot(list(rows.values()), tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_path = plots.write_rows_csv(list(rows.values()), tmp_path / "pareto.csv")
    assert csv_path.read_text().splitlines()[0].startswith("name,env,progression")


def test_load_evaluations_reads_finished_ones_only(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/metrics.json").write_text(json.dumps(_m(0.1, 1)))
    (tmp_path / "unfinished").mkdir()  # no metrics.json yet
    (tmp_path / ".resume").mkdir()
    (tmp_path / ".resume/metrics.json").write_text("{}")
    assert list(plots.load_evaluations(tmp_path)) == ["a"]
