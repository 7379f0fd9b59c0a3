"""The plan-cost sweep of App. C.3: progression and plan tokens per episode against `ppo.plan_cost`.

Reads the `metrics/ppo-<ablation>.json` records that `dvc exp run -S ppo.plan_cost=...` leaves in
each experiment (as `dvc exp show --json` reports them, or as files) and draws one figure. It
computes nothing about training: every number is read from a finished PPO run's metrics.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

COLUMNS = ("plan_cost", "progression", "plan_tokens_per_episode", "plan_rate", "return", "runs")


def metrics_in_exp_show(payload, ablation: str) -> Iterator[dict]:
    """Every `metrics/ppo-<ablation>.json` record inside `dvc exp show --json` output (the
    workspace, branches and experiments alike; the nesting differs between DVC versions)."""
    wanted = f"ppo-{ablation}.json"
    if isinstance(payload, dict):
        for key, value in payload.items():
            if key == "metrics" and isinstance(value, dict):
                for path, entry in value.items():
                    if path.endswith(wanted) and isinstance(entry, dict) and isinstance(entry.get("data"), dict):
                        yield entry["data"]
            else:
                yield from metrics_in_exp_show(value, ablation)
    elif isinstance(payload, list):
        for item in payload:
            yield from metrics_in_exp_show(item, ablation)


def sweep_rows(records: Iterable[dict]) -> list[dict]:
    """One row per plan cost (mean over runs at that cost), sorted by cost."""
    by_cost: dict[float, list[dict]] = {}
    for record in records:
        if "plan_cost" in record and "progression" in record:
            by_cost.setdefault(float(record["plan_cost"]), []).append(record)
    rows = []
    for cost in sorted(by_cost):
        runs = by_cost[cost]
        row = {"plan_cost": cost, "runs": len(runs)}
        for key in ("progression", "plan_tokens_per_episode", "plan_rate", "return"):
            row[key] = sum(float(r.get(key, 0.0)) for r in runs) / len(runs)
        rows.append(row)
    return rows


def write_sweep(rows: list[dict], out_dir: Path, ablation: str) -> tuple[Path, Path]:
    """`cost_sweep.csv` and `cost_sweep.png` (progression and plan tokens/episode vs cost), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError(f"no finished ppo@{ablation} runs to plot (run `dvc exp run -S ppo.plan_cost=...` first)")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "cost_sweep.csv", out_dir / "cost_sweep.png"
    tmp = csv_path.with_name(f".{csv_path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in COLUMNS} for row in rows)
    os.replace(tmp, csv_path)

    costs = [row["plan_cost"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(costs, [row["progression"] for row in rows], marker="o")
    left.set_ylabel("progression (end of training)")
    right.plot(costs, [row["plan_tokens_per_episode"] for row in rows], marker="o", color="tab:orange")
    right.set_ylabel("plan tokens per episode")
    for axis in (left, right):
        axis.set_xlabel("plan_cost (reward per plan token)")
        if min(costs) >= 0 and max(costs) > 0:
            axis.set_xscale("symlog", linthresh=min([c for c in costs if c > 0] or [1e-3]))
        axis.grid(alpha=0.3)
    fig.suptitle(f"ppo@{ablation}: plan-cost sweep (App. C.3)")
    fig.tight_layout()
    tmp_png = png_path.with_name(f".{png_path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp_png, dpi=120)
    plt.close(fig)
    os.replace(tmp_png, png_path)
    return csv_path, png_path


def load_records(exp_show_json: str | None = None, files: Iterable[Path] = (), ablation: str = "sft_dynamic") -> list[dict]:
    records = [json.loads(Path(f).read_text()) for f in files]
    if exp_show_json:
        records += list(metrics_in_exp_show(json.loads(exp_show_json), ablation))
    return records
