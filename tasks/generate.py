"""DVC stage `generate`: teacher rollouts (Crafter and POGS experts) -> `data/teacher/` shards.

Thin: validates its params, calls dynaplan.data.generation (resumable: finished shards are kept),
writes the dataset manifest and `reports/generate/metrics.json`, logs to MLflow.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynaplan import tracking
from dynaplan.config import load_params, usage_errors_exit_2
from dynaplan.data.dataset import write_csv_atomic, write_json_atomic
from dynaplan.data.generation import episode_table, generate_dataset
from dynaplan.data.schema import STEP_SCHEMA

OUT_DIR = Path("data/teacher")
METRICS = Path("reports/generate/metrics.json")
EPISODES_PLOT = Path("reports/generate/episodes.csv")


@usage_errors_exit_2()
def main() -> int:
    params = load_params()
    section = {
        "generate": params.generate, "envs": params.envs, "prompt": params.prompt,
        "seeds": params.seeds, "model.dir": params.model.dir,
    }
    with tracking.stage_run("generate", section):
        result = generate_dataset(params, OUT_DIR)
        manifest = result.manifest
        metrics = {
            "rows": manifest["rows"],
            "episodes": manifest["episodes"],
            "envs": manifest["envs"],
            "shards": len(manifest["shards"]),
            "plan_rate": manifest["plan_rate"],
            "digest": manifest["digest"],
        }
        write_json_atomic(metrics, METRICS)
        write_csv_atomic(episode_table(OUT_DIR), EPISODES_PLOT)
        tracking.log_metrics({**metrics, "steps_per_second": result.steps_per_second, "seconds": result.seconds,
                              "reused_shards": result.reused_shards})
        tracking.log_dataset(OUT_DIR, "teacher", manifest["digest"], "training", schema=STEP_SCHEMA)
        tracking.log_artifact(OUT_DIR / "manifest.json")
    print(
        f"generate: {manifest['rows']} steps in {manifest['episodes']} episodes, {len(manifest['shards'])} shards "
        f"({result.reused_shards} kept from before), {result.steps_per_second:.1f} steps/s; digest {manifest['digest'][:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
