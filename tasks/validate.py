"""DVC stage `validate`: the Great Expectations gate over the teacher dataset.

Thin: validates its params, runs dynaplan.data.expectations, writes the JSON summary (a DVC
metric) and the GX Data Docs, logs to MLflow, and exits 1 naming every failed expectation with
example rows, so `dvc repro` stops before training. It never touches the data.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynaplan import tracking
from dynaplan.config import load_params, usage_errors_exit_2
from dynaplan.data.dataset import read_manifest, read_table, write_json_atomic
from dynaplan.data.expectations import chat_token_counter, env_action_sets, validate_dataset

DATA_DIR = Path("data/teacher")
SUMMARY = Path("reports/validate/summary.json")
DOCS_DIR = Path("reports/validate/data_docs")


@usage_errors_exit_2()
def main() -> int:
    params = load_params()
    section = {
        "validate": params.validation, "generate.plan_interval_min": params.generate.plan_interval_min,
        "generate.plan_interval_max": params.generate.plan_interval_max, "seeds": params.seeds,
        "envs": params.envs, "model.dir": params.model.dir,
    }
    with tracking.stage_run("validate", section):
        manifest = read_manifest(DATA_DIR)
        table = read_table(DATA_DIR)
        report = validate_dataset(
            table, params, action_sets=env_action_sets(params, sorted(manifest["envs"])),
            count_seq_tokens=chat_token_counter(params.model.dir), docs_dir=DOCS_DIR,
        )
        summary = {**report.summary(), "dataset_digest": manifest["digest"]}
        write_json_atomic(summary, SUMMARY)
        tracking.log_dataset(DATA_DIR, "teacher", manifest["digest"], "validation")
        tracking.log_metrics({"success": report.success, "rows": report.rows, "seconds": report.seconds,
                              "failed_expectations": summary["failed_expectations"]})
        tracking.log_artifact(SUMMARY)
        tracking.log_artifact(DOCS_DIR, "data_docs")
        if not report.success:
            print(f"validate: the teacher dataset failed its expectations\n{report.failure_message()}", file=sys.stderr)
            raise SystemExit(1)  # inside the run, so MLflow marks it FAILED
    print(f"validate: {len(report.outcomes)} expectations passed on {report.rows} rows in {report.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
