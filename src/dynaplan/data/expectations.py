"""The Great Expectations suite over a step-record dataset: the gate before any training.

Builds the suite from the params (plan bounds, intervals, seeds, sequence length) and the envs'
action sets, runs it in an ephemeral GX context over a pandas frame, writes GX Data Docs (HTML)
and returns a report with per-expectation success, unexpected counts and example bad rows.
It must not change or delete any data.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from dynaplan.agent.protocol import MAX_PLAN_CHARS, PLAN_CLOSE, PLAN_OPEN, target_regex
from dynaplan.config import Params
from dynaplan.data.schema import COLUMNS, NULLABLE
from dynaplan.envs import ENV_NAMES

SUITE_NAME = "step_records"
ROW_ID = ["episode_id", "step"]
EXAMPLES = 5
# Columns computed from the stored ones so that GX can check relations between them.
DERIVED = ("plan_open_tags", "plan_close_tags", "target_has_plan", "target_trimmed", "seq_tokens", "seed_held_out")


@dataclass
class Outcome:
    name: str
    expectation: str
    success: bool
    unexpected_count: int
    element_count: int
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ValidationReport:
    success: bool
    rows: int
    outcomes: list[Outcome]
    seconds: float
    data_docs: str | None = None

    def summary(self) -> dict[str, Any]:
        """The DVC metric: overall success, rows and per-expectation success/unexpected counts."""
        return {
            "success": self.success,
            "rows": self.rows,
            "failed_expectations": sum(not o.success for o in self.outcomes),
            "expectations": {
                o.name: {"success": o.success, "unexpected_count": o.unexpected_count} for o in self.outcomes
            },
        }

    def failure_message(self) -> str:
        failed = [o for o in self.outcomes if not o.success]
        lines = [f"{len(failed)} of {len(self.outcomes)} expectations failed on {self.rows} rows:"]
        for outcome in failed:
            lines.append(
                f"  FAILED {outcome.name} ({outcome.expectation}): "
                f"{outcome.unexpected_count} of {outcome.element_count} rows unexpected; examples:"
            )
            for example in outcome.examples:
                shown = ", ".join(f"{k}={_short(v)}" for k, v in example.items())
                lines.append(f"    {shown}")
        if self.data_docs:
            lines.append(f"full report: {self.data_docs}")
        return "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value.item() if hasattr(value, "item") else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def env_action_sets(params: Params, envs: Sequence[str] = ENV_NAMES) -> dict[str, tuple[str, ...]]:
    """Each env's action names, from the env itself (built with the params' settings)."""
    from dynaplan.envs import make_env

    kwargs = {"crafter": params.envs.crafter.model_dump(mode="json"), "pogs": params.envs.pogs.model_dump(mode="json")}
    return {env: tuple(make_env(env, **kwargs[env]).action_names) for env in envs}


def chat_token_counter(tokenizer_dir: str | os.PathLike[str]) -> Callable[[pd.DataFrame], list[int]]:
    """Counts prompt plus target tokens per row as the model sees them (chat template applied)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def count(frame: pd.DataFrame) -> list[int]:
        conversations = [
            json.loads(messages) + [{"role": "assistant", "content": target}]
            for messages, target in zip(frame["messages"], frame["target"].fillna(""))
        ]
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


def validation_frame(
    data: pa.Table | pd.DataFrame, count_seq_tokens: Callable[[pd.DataFrame], list[int]], held_out_seeds: range
) -> pd.DataFrame:
    """The dataset as pandas plus the derived columns the suite checks."""
    frame = data.to_pandas() if isinstance(data, pa.Table) else data.copy()
    target = frame["target"].fillna("")
    frame["plan_open_tags"] = target.str.count(re.escape(PLAN_OPEN))
    frame["plan_close_tags"] = target.str.count(re.escape(PLAN_CLOSE))
    frame["target_has_plan"] = target.str.startswith(PLAN_OPEN)
    frame["target_trimmed"] = target == target.str.strip()
    frame["seq_tokens"] = count_seq_tokens(frame) if len(frame) else []
    frame["seed_held_out"] = frame["seed"].between(held_out_seeds.start, held_out_seeds.stop - 1)
    return frame


def build_expectations(params: Params, action_sets: Mapping[str, Sequence[str]]) -> list[Any]:
    """The suite's expectations; each carries its summary name in `meta['name']`."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    checks = params.validation
    gen = params.generate
    expectations: list[Any] = []

    def add(name: str, expectation: Any) -> None:
        expectation.meta = {"name": name}
        expectation.description = name.replace("_", " ")
        expectations.append(expectation)

    add("has_rows", gxe.ExpectTableRowCountToBeBetween(min_value=1))
    add("env_known", gxe.ExpectColumnValuesToBeInSet(column="env", value_set=list(ENV_NAMES)))
    for env, actions in sorted(action_sets.items()):
        # pandas may run the regex with RE2 (pyarrow strings), which caps repetition counts at
        # 1000: the plan's length bound is left to plan_length_within_bounds.
        pattern = target_regex(actions).pattern.replace("{1,%d}?" % MAX_PLAN_CHARS, "+?")
        add(f"target_matches_protocol.{env}", gxe.ExpectColumnValuesToMatchRegex(column="target", regex=pattern, row_condition=Column("env") == env))
        add(f"action_in_action_set.{env}", gxe.ExpectColumnValuesToBeInSet(column="action", value_set=list(actions), row_condition=Column("env") == env))
    # `$` may match before a final newline (Python's re): trailing whitespace is checked here.
    add("target_without_surrounding_whitespace", gxe.ExpectColumnValuesToBeInSet(column="target_trimmed", value_set=[True]))
    add("plan_tags_balanced", gxe.ExpectColumnPairValuesToBeEqual(column_A="plan_open_tags", column_B="plan_close_tags"))
    add("at_most_one_plan_block", gxe.ExpectColumnValuesToBeBetween(column="plan_open_tags", min_value=0, max_value=1))
    add("planned_agrees_with_target", gxe.ExpectColumnPairValuesToBeEqual(column_A="planned", column_B="target_has_plan"))
    add("plan_text_present_when_planned", gxe.ExpectColumnValuesToNotBeNull(column="plan_text", row_condition=Column("planned") == True))  # noqa: E712
    add("plan_length_within_bounds", gxe.ExpectColumnValueLengthsToBeBetween(column="plan_text", min_value=checks.plan_min_chars, max_value=checks.plan_max_chars))
    add("plan_interval_within_range", gxe.ExpectColumnValuesToBeBetween(column="plan_interval", min_value=gen.plan_interval_min, max_value=gen.plan_interval_max))
    for column in COLUMNS:
        if column not in NULLABLE:
            add(f"not_null.{column}", gxe.ExpectColumnValuesToNotBeNull(column=column))
    add("unique_episode_step", gxe.ExpectCompoundColumnsToBeUnique(column_list=list(ROW_ID)))
    add("step_non_negative", gxe.ExpectColumnValuesToBeBetween(column="step", min_value=0))
    add("seq_within_max_seq_len", gxe.ExpectColumnValuesToBeBetween(column="seq_tokens", min_value=1, max_value=checks.max_seq_len))
    # A training row on a held-out seed (Params.eval_seed_range) would leak the evaluation.
    add("train_seeds_disjoint_from_eval", gxe.ExpectColumnValuesToBeInSet(column="seed_held_out", value_set=[False]))
    add("seed_from_train_start", gxe.ExpectColumnValuesToBeBetween(column="seed", min_value=params.seeds.train_start))
    return expectations


def run_suite(
    frame: pd.DataFrame,
    expectations: Sequence[Any],
    docs_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[Outcome], str | None]:
    """Run the expectations over the frame in an ephemeral GX context; optionally build Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    actions = []
    if docs_dir is not None:
        docs_dir = Path(docs_dir).resolve()
        context.add_data_docs_site(
            site_name="local",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=["local"]))
    batch_definition = (
        context.data_sources.add_pandas("dynaplan").add_dataframe_asset("steps").add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=SUITE_NAME, data=batch_definition, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ROW_ID, "partial_unexpected_count": EXAMPLES},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    outcomes: list[Outcome] = []
    for run in result.run_results.values():
        for item in run.results:
            config = item.expectation_config
            details = item.result or {}
            outcomes.append(
                Outcome(
                    name=(config.meta or {}).get("name", config.type),
                    expectation=config.type,
                    success=bool(item.success),
                    unexpected_count=int(details.get("unexpected_count") or 0),
                    element_count=int(details.get("element_count") or len(frame)),
                    examples=_examples(details, item.success, item.exception_info),
                )
            )
    index = docs_dir / "index.html" if docs_dir is not None else None
    return outcomes, (str(index) if index is not None and index.is_file() else None)


def _examples(details: Mapping[str, Any], success: bool, exception_info: Any) -> list[dict[str, Any]]:
    if success:
        return []
    rows = details.get("unexpected_index_list") or []
    if rows:
        return [dict(row) for row in rows[:EXAMPLES]]
    if details.get("observed_value") is not None:
        return [{"observed_value": details["observed_value"]}]
    if exception_info and isinstance(exception_info, Mapping):
        messages = [v.get("exception_message") for v in exception_info.values() if isinstance(v, Mapping)]
        messages.append(exception_info.get("exception_message"))
        return [{"error": m} for m in messages if m][:1]
    return []


def validate_dataset(
    data: pa.Table | pd.DataFrame,
    params: Params,
    *,
    action_sets: Mapping[str, Sequence[str]],
    count_seq_tokens: Callable[[pd.DataFrame], list[int]],
    docs_dir: str | os.PathLike[str] | None = None,
) -> ValidationReport:
    """Run the whole suite over a dataset and report; never raises on bad data (see `success`)."""
    started = time.perf_counter()
    frame = validation_frame(data, count_seq_tokens, params.eval_seed_range())
    outcomes, docs = run_suite(frame, build_expectations(params, action_sets), docs_dir)
    success = all(o.success for o in outcomes)
    return ValidationReport(success, len(frame), outcomes, time.perf_counter() - started, docs)
