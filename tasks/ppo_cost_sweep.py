"""The App. C.3 plan-cost sweep plot: after `dvc exp run -S ppo.plan_cost=C` for several C, read
every experiment's metrics/ppo-<ablation>.json from `dvc exp show --json` (or given files) and
write reports/ppo_cost_sweep/cost_sweep.{png,csv}. Thin: dynaplan.train.ppo_sweep does the work.

    for c in 0 0.002 0.01 0.05; do dvc exp run -S ppo.plan_cost=$c ppo@sft_dynamic; done
    python -m tasks.ppo_cost_sweep --ablation sft_dynamic
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from dynaplan.config import EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    from dynaplan.train.ppo_sweep import load_records, sweep_rows, write_sweep

    parser = argparse.ArgumentParser(prog="python -m tasks.ppo_cost_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", default="sft_dynamic")
    parser.add_argument("--metrics", type=Path, nargs="*", default=[], help="metrics JSON files instead of dvc experiments")
    parser.add_argument("--out", type=Path, default=Path("reports/ppo_cost_sweep"))
    args = parser.parse_args(argv)
    exp_show = None
    if not args.metrics:
        done = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"error: `dvc exp show --json` failed: {done.stderr.strip()}", file=sys.stderr)
            return 1
        exp_show = done.stdout
    rows = sweep_rows(load_records(exp_show, args.metrics, args.ablation))
    try:
        csv_path, png_path = write_sweep(rows, args.out, args.ablation)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    for row in rows:
        print(f"plan_cost {row['plan_cost']:g}: progression {row['progression']:.3f}, "
              f"plan tokens/episode {row['plan_tokens_per_episode']:.1f} ({row['runs']} runs)")
    print(f"-> {png_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
