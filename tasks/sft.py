"""DVC stage `sft@<variant>` (dynamic | naive): SFT priming of the student on the validated teacher
steps; writes models/sft-<variant>/adapter, checkpoints/sft-<variant>/ (resume point) and
metrics/sft-<variant>.json. Thin: params in, dynaplan.train.sft.sft_stage, exit code out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynaplan.config import load_params, usage_errors_exit_2
from dynaplan.train.sft_data import SftInputError

DATA_DIR = Path("data/teacher")
REPORT = Path("reports/validate/summary.json")


def paths_for(variant: str, data_dir: Path = DATA_DIR, report: Path = REPORT, base_dir: Path | None = None):
    from dynaplan.train.sft import SftPaths

    return SftPaths(
        data_dir=data_dir,
        report=report,
        base_dir=base_dir if base_dir is not None else Path(load_params().model.dir),
        out_dir=Path(f"models/sft-{variant}"),
        checkpoint_dir=Path(f"checkpoints/sft-{variant}"),
    )


@usage_errors_exit_2(SftInputError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.sft", description=__doc__)
    parser.add_argument("--variant", choices=["dynamic", "naive"], required=True)
    args = parser.parse_args(argv)
    from dynaplan.train.sft import sft_stage

    params = load_params()
    out = sft_stage(params, args.variant, paths_for(args.variant), Path(f"metrics/sft-{args.variant}.json"))
    print(
        f"sft@{args.variant}: held-out loss {out['heldout_loss']:.3f}, action accuracy {out['action_accuracy']:.3f}, "
        f"format valid {out['format_valid']:.3f}, plan rate {out['plan_rate']:.3f} (teacher {out['teacher_plan_rate']:.3f}), "
        f"KL to base {out['kl_to_base']:.4f} -> {out['model_uri']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
