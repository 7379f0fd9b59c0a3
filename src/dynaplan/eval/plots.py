"""PNG plots of evaluations (matplotlib, Agg backend): one evaluation's curves and success rates,
the Goldilocks sweep and the Pareto front of progression against tokens per episode.

Takes numbers already computed (metrics.json contents, curve rows); it must not compute metrics
or run anything. Every plot is written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: DVC stages and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

# Sweep labels in the order they appear on the x axis of the Goldilocks plot.
NEVER, DYNAMIC = "never", "dynamic"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def evaluation_plots(name: str, env: str, metrics: Mapping, curve: Sequence[Mapping], out_dir: str | os.PathLike[str]) -> Path:
    """plots/curve.png (mean cumulative progression and tokens by step) and, for Crafter,
    plots/success_rates.png (per-achievement success in percent)."""
    out = Path(out_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [row["step"] for row in curve]
    ax.plot(steps, [row["progression"] for row in curve], color="tab:blue", label="progression")
    ax.set_xlabel("step")
    ax.set_ylabel("mean progression", color="tab:blue")
    twin = ax.twinx()
    twin.plot(steps, [row["generated_tokens"] for row in curve], color="tab:orange", label="generated tokens")
    twin.set_ylabel("mean cumulative generated tokens", color="tab:orange")
    ax.set_title(f"{name}: progression {metrics['progression']:.3f} ± {metrics['progression_se']:.3f} "
                 f"({metrics['episodes']} episodes)")
    _save(fig, out / "curve.png")
    rates = metrics.get("success_rates", {})
    if env == "crafter" and rates:
        fig, ax = plt.subplots(figsize=(8, 5))
        names = list(rates)
        ax.barh(names, [rates[n] for n in names], color="tab:green")
        ax.set_xlim(0, 100)
        ax.set_xlabel("success rate (%)")
        ax.invert_yaxis()
        ax.set_title(f"{name}: Crafter score {metrics.get('crafter_score', float('nan')):.2f}%")
        _save(fig, out / "success_rates.png")
    return out


def load_evaluations(root: str | os.PathLike[str]) -> dict[str, dict]:
    """Every complete evaluation under `root` (`<root>/<name>/metrics.json`), by name."""
    found = {}
    for path in sorted(Path(root).glob("*/metrics.json")):
        if path.parent.name.startswith("."):
            continue
        found[path.parent.name] = json.loads(path.read_text())
    return found


def sweep_position(config: Mapping) -> tuple[float, str]:
    """Where an evaluation sits on the Goldilocks x axis: every_k at k, never beyond the largest
    interval, dynamic after it; returns (x, label)."""
    mode = config.get("mode")
    if mode == "every_k":
        return float(config["k"]), f"every {config['k']}"
    if mode == "always":
        return 1.0, "every 1"
    if mode == NEVER:
        return math.inf, NEVER
    return math.nan, DYNAMIC


def goldilocks_rows(evaluations: Mapping[str, Mapping]) -> list[dict]:
    """One row per sweep point, fixed intervals first (ascending), then never, then dynamic."""
    rows = []
    for name, m in evaluations.items():
        x, label = sweep_position(m.get("config", {}))
        rows.append({
            "name": name, "label": label, "interval": x,
            "progression": m["progression"], "progression_se": m["progression_se"],
            "tokens_per_episode": m["generated_tokens"], "tokens_per_episode_se": m["generated_tokens_se"],
            "plan_tokens_per_episode": m["plan_tokens"], "plan_rate": m["plan_rate"],
        })
    rows.sort(key=lambda r: (math.isnan(r["interval"]), r["interval"] if not math.isnan(r["interval"]) else 0, r["name"]))
    return rows


def goldilocks_plot(rows: Sequence[Mapping], path: str | os.PathLike[str], title: str = "Goldilocks sweep") -> Path:
    """Progression (with SE bars) and tokens per episode against the planning interval."""
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [r["label"] for r in rows]
    xs = list(range(len(rows)))
    ax.errorbar(xs, [r["progression"] for r in rows], yerr=[r["progression_se"] for r in rows],
                marker="o", color="tab:blue", capsize=3)
    ax.set_xticks(xs, labels, rotation=30)
    ax.set_xlabel("planning interval")
    ax.set_ylabel("progression", color="tab:blue")
    twin = ax.twinx()
    twin.bar(xs, [r["tokens_per_episode"] for r in rows], alpha=0.3, color="tab:orange")
    twin.set_ylabel("generated tokens per episode", color="tab:orange")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_title(title)
    return _save(fig, Path(path))


def pareto_rows(evaluations: Mapping[str, Mapping]) -> list[dict]:
    """Progression and tokens per episode of every evaluation, flagged when on the Pareto front
    (no other agent has at least the progression with at most the tokens, one strictly better)."""
    rows = [
        {"name": name, "env": m.get("config", {}).get("env", "crafter"), "progression": m["progression"],
         "progression_se": m["progression_se"], "tokens_per_episode": m["generated_tokens"]}
        for name, m in evaluations.items()
    ]
    for r in rows:
        r["pareto"] = not any(
            o is not r and o["env"] == r["env"]
            and o["progression"] >= r["progression"] and o["tokens_per_episode"] <= r["tokens_per_episode"]
            and (o["progression"] > r["progression"] or o["tokens_per_episode"] < r["tokens_per_episode"])
            for o in rows
        )
    rows.sort(key=lambda r: (r["env"], r["tokens_per_episode"], r["name"]))
    return rows


def pareto_plot(rows: Sequence[Mapping], path: str | os.PathLike[str]) -> Path:
    """Progression against generated tokens per episode, one panel per env, the front joined."""
    envs = sorted({r["env"] for r in rows}) or ["crafter"]
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4.5), squeeze=False)
    for ax, env in zip(axes[0], envs):
        mine = [r for r in rows if r["env"] == env]
        for r in mine:
            ax.errorbar(r["tokens_per_episode"], r["progression"], yerr=r["progression_se"], marker="o",
                        color="tab:red" if r["pareto"] else "tab:gray", capsize=3)
            ax.annotate(r["name"], (r["tokens_per_episode"], r["progression"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        front = sorted((r for r in mine if r["pareto"]), key=lambda r: r["tokens_per_episode"])
        ax.plot([r["tokens_per_episode"] for r in front], [r["progression"] for r in front], color="tab:red", alpha=0.5)
        if any(r["tokens_per_episode"] > 0 for r in mine):
            ax.set_xscale("symlog")
        ax.set_xlabel("generated tokens per episode")
        ax.set_ylabel("progression")
        ax.set_title(f"{env}: progression vs tokens")
    return _save(fig, Path(path))


def write_rows_csv(rows: Sequence[Mapping], path: str | os.PathLike[str]) -> Path:
    """Rows as CSV (a DVC plots source), written atomically; infinite intervals become 'inf'."""
    import csv
    import io

    path = Path(path)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return path
