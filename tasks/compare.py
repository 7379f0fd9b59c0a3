"""DVC stages `goldilocks_plot` and `pareto`: read every finished evaluation under reports/eval/
and draw the Goldilocks sweep (progression and tokens against the planning interval) or the
Pareto plot of progression against tokens per episode, as PNG plus a CSV for `dvc plots`.

Thin: no metric is computed here, only read from each evaluation's metrics.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynaplan.eval import plots
from dynaplan.eval.runner import EVAL_ROOT
from dynaplan.tracking import log_artifact, log_metrics, stage_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.compare", description=__doc__)
    parser.add_argument("what", choices=["goldilocks", "pareto"])
    parser.add_argument("--prefix", default="goldilocks-", help="goldilocks: evaluation names to include")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    evaluations = plots.load_evaluations(EVAL_ROOT)
    if args.what == "goldilocks":
        evaluations = {k: v for k, v in evaluations.items() if k.startswith(args.prefix)}
    if not evaluations:
        print(f"error: no finished evaluations under {EVAL_ROOT} for {args.what}", file=sys.stderr)
        return 1
    with stage_run(args.what, {"evaluations": sorted(evaluations)}):
        if args.what == "goldilocks":
            rows = plots.goldilocks_rows(evaluations)
            plots.goldilocks_plot(rows, args.out / "goldilocks.png")
            for i, row in enumerate(rows):
                log_metrics({"progression": row["progression"], "tokens_per_episode": row["tokens_per_episode"]}, step=i)
        else:
            rows = plots.pareto_rows(evaluations)
            plots.pareto_plot(rows, args.out / "pareto.png")
        plots.write_rows_csv(rows, args.out / f"{args.what}.csv")
        log_artifact(args.out, artifact_path=args.what)
    for row in rows:
        print(f"{row['name']:40s} progression {row['progression']:.3f}  tokens/episode {row['tokens_per_episode']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
