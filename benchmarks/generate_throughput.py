"""Teacher-data throughput side by side: steps/s with 1 and with 2 worker processes (and their
ratio, checking both give the same dataset digest), and the validation time per 10,000 rows.

    nice -n 10 .venv/bin/python benchmarks/generate_throughput.py [--crafter-episodes 4 --pogs-episodes 16]

Uses the tokenizer in model.dir (the base_model stage) or the one extracted from the embedded GGUF.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from dynaplan.config import load_params, parse_params
from dynaplan.data import dataset
from dynaplan.data.expectations import chat_token_counter, env_action_sets, validate_dataset
from dynaplan.data.generation import generate_dataset


def tokenizer_dir(model_dir: str) -> Path:
    if (Path(model_dir) / "tokenizer.json").is_file():
        return Path(model_dir)
    from dynaplan.models.materialize import smollm2_tokenizer_dir

    return smollm2_tokenizer_dir()


def scaled_to(table: pa.Table, rows: int) -> pa.Table:
    """`table` repeated until it has `rows` rows, each copy with its own episode ids."""
    copies = []
    for copy in range(-(-rows // table.num_rows)):
        ids = pc.binary_join_element_wise(table["episode_id"], pa.scalar(f"-copy{copy}"), "")
        copies.append(table.set_column(table.schema.get_field_index("episode_id"), "episode_id", ids))
    return pa.concat_tables(copies).slice(0, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crafter-episodes", type=int, default=4)
    parser.add_argument("--crafter-max-steps", type=int, default=100)
    parser.add_argument("--pogs-episodes", type=int, default=16)
    parser.add_argument("--validate-rows", type=int, default=10_000)
    args = parser.parse_args()

    base = load_params().model_dump(mode="json", by_alias=True)
    base["generate"].update(
        crafter_episodes=args.crafter_episodes, crafter_max_steps=args.crafter_max_steps,
        pogs_episodes=args.pogs_episodes, episodes_per_shard=1,
    )
    params = parse_params(base)
    tokenizer = tokenizer_dir(params.model.dir)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            out = Path(tmp) / f"w{workers}"
            started = time.perf_counter()
            result = generate_dataset(params, out, tokenizer_dir=tokenizer, workers=workers, progress=False)
            seconds = time.perf_counter() - started  # whole call: process start-up included
            results[workers] = (result.manifest["rows"], seconds, result.manifest["digest"])
            print(f"workers={workers}: {result.manifest['rows']} steps in {seconds:.1f}s = {result.manifest['rows'] / seconds:.1f} steps/s")
        table = dataset.read_table(Path(tmp) / "w1")
    rate = {w: rows / seconds for w, (rows, seconds, _) in results.items()}
    same = results[1][2] == results[2][2]
    print(f"speed-up 2 workers / 1 worker: {rate[2] / rate[1]:.2f}x (same dataset digest: {same})")

    big = scaled_to(table, args.validate_rows)
    counter = chat_token_counter(tokenizer)
    action_sets = env_action_sets(params)
    validate_dataset(table.slice(0, 50), params, action_sets=action_sets, count_seq_tokens=counter)  # warm-up imports
    started = time.perf_counter()
    report = validate_dataset(big, params, action_sets=action_sets, count_seq_tokens=counter)
    seconds = time.perf_counter() - started
    print(
        f"validate: {report.rows} rows in {seconds:.1f}s = {seconds * 10_000 / report.rows:.1f}s per 10,000 rows "
        f"({len(report.outcomes)} expectations, success={report.success})"
    )


if __name__ == "__main__":
    main()
