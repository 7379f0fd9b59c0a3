"""The step record: one row per agent step, the unit of every dataset (DESIGN.md section 4).

Holds the column names, their Arrow types and the helpers that turn rows into a table with a
fixed column order, so the same rows always give the same Parquet bytes. No I/O policy here
beyond that; generation lives in tasks/ and the data modules that call this.
"""

from __future__ import annotations

import pyarrow as pa

# `messages` is the chat prompt as canonical JSON (sorted keys, no spaces) so that the bytes are
# stable; `history` the JSON list of [observation, action] pairs in the window and
# `current_plan` the plan in effect before the step: with `observation` they let any view
# (the plan-stripped "naive" one, another history length) rebuild the prompt with the shared
# prompt builder instead of storing a second copy.
STEP_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("env", pa.string()),
        ("seed", pa.int64()),
        ("step", pa.int32()),
        ("messages", pa.string()),
        ("target", pa.string()),
        ("action", pa.string()),
        ("planned", pa.bool_()),
        ("plan_text", pa.string()),
        ("plan_tokens", pa.int32()),
        ("reward", pa.float64()),
        ("terminated", pa.bool_()),
        ("truncated", pa.bool_()),
        ("achievements", pa.string()),
        ("teacher", pa.string()),
        ("plan_interval", pa.int32()),
        ("variant", pa.string()),
        ("observation", pa.string()),
        ("history", pa.string()),
        ("current_plan", pa.string()),
        ("feedback", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(STEP_SCHEMA.names)
# Columns that may hold nulls by design: no plan written this step, no plan yet, no feedback.
NULLABLE: frozenset[str] = frozenset({"plan_text", "current_plan", "feedback"})


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with exactly COLUMNS) to an Arrow table with the canonical schema."""
    for i, row in enumerate(rows):
        missing = set(COLUMNS) - set(row)
        extra = set(row) - set(COLUMNS)
        if missing or extra:
            raise ValueError(f"step record {i}: missing columns {sorted(missing)}, unexpected {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=STEP_SCHEMA)
