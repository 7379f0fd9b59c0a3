"""DVC stage `ppo@<ablation>` (sft_dynamic | sft_never | base): PPO with a plan-token cost from the
SFT adapter (or the base model); writes models/ppo-<ablation>/, checkpoints/ppo-<ablation>/ (resume
point) and metrics/ppo-<ablation>.json. Thin: params in, dynaplan.train.ppo.ppo_stage, exit code out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynaplan.config import load_params, usage_errors_exit_2


def paths_for(ablation: str, base_dir: Path):
    from dynaplan.train.ppo import PpoPaths

    return PpoPaths(
        base_dir=base_dir,
        sft_root=Path("models"),
        out_dir=Path(f"models/ppo-{ablation}"),
        checkpoint_dir=Path(f"checkpoints/ppo-{ablation}"),
        metrics_path=Path(f"metrics/ppo-{ablation}.json"),
    )


@usage_errors_exit_2()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.ppo", description=__doc__)
    parser.add_argument("--ablation", required=True, help="sft_dynamic | sft_never | base")
    args = parser.parse_args(argv)
    params = load_params()  # before importing torch: a bad params file fails in a blink
    from dynaplan.train.ppo import PpoDivergence, ppo_stage

    try:
        out = ppo_stage(params, args.ablation, paths_for(args.ablation, Path(params.model.dir)))
    except PpoDivergence as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"ppo@{args.ablation} (plan_cost {out['plan_cost']}): {out['iterations']} iterations, return {out['return']:.3f}, "
        f"progression {out['progression']:.3f}, plan tokens/episode {out['plan_tokens_per_episode']:.1f} -> {out['model_uri']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
