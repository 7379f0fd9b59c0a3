"""The plan-cost sweep plot (train/ppo_sweep.py) from `dvc exp show --json`-shaped records."""

from __future__ import annotations

from dynaplan.train.ppo_sweep import metrics_in_exp_show, sweep_rows, write_sweep


def _exp(rev, cost, progression, plan_tokens):
    record = {"plan_cost": cost, "progression": progression, "plan_tokens_per_episode": plan_tokens, "plan_rate": 0.1, "return": 1.0}
    return {"rev": rev, "data": {"metrics": {"metrics/ppo-sft_dynamic.json": {"data": record},
                                             "metrics/ppo-base.json": {"data": {**record, "plan_cost": 99.0}}}}}


def test_sweep_reads_every_experiment_and_averages_runs_per_cost(tmp_path):
    payload = [
        {**_exp("workspace", 0.0, 0.30, 40.0), "experiments": None},
        {**_exp("abc", 0.0, 0.20, 20.0), "experiments": [{"revs": [_exp("e1", 0.01, 0.31, 8.0), _exp("e2", 0.05, 0.29, 1.0)]}]},
    ]
    records = list(metrics_in_exp_show(payload, "sft_dynamic"))
    assert len(records) == 4 and all(r["plan_cost"] != 99.0 for r in records)
    rows = sweep_rows(records)
    assert [r["plan_cost"] for r in rows] == [0.0, 0.01, 0.05]
    assert rows[0]["runs"] == 2 and abs(rows[0]["progression"] - 0.25) < 1e-12 and rows[0]["plan_tokens_per_episode"] == 30.0
    csv_path, png_path = write_sweep(rows, tmp_path, "sft_dynamic")
    assert png_path.stat().st_size > 1000
    assert csv_path.read_text().splitlines()[0] == "plan_cost,progression,plan_tokens_per_episode,plan_rate,return,runs"
    assert len(csv_path.read_text().splitlines()) == 4
