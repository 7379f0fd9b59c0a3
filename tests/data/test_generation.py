"""Teacher data generation: determinism, resumption after a kill, seed split, the naive view.

Runs the real envs and teachers on a tiny profile (short Crafter episodes on a small map, a few
POGS episodes) with the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dynaplan.agent.prompts import build_messages, planning_instruction, Turn
from dynaplan.config import ConfigError, Params, parse_params
from dynaplan.data import dataset
from dynaplan.data.generation import ENV_ORDER, generate_dataset, naive_view, token_counter, train_seeds


def tiny_raw(**generate) -> dict:
    return {
        "envs": {"crafter": {"area": 32}},
        "generate": {
            "crafter_episodes": 2, "crafter_max_steps": 12, "pogs_episodes": 3,
            "episodes_per_shard": 1, "workers": 1, **generate,
        },
    }


def tiny_params(**generate) -> Params:
    return parse_params(tiny_raw(**generate))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm2_tokenizer_dir):
    """One uninterrupted single-process run of the tiny profile."""
    out = tmp_path_factory.mktemp("reference") / "teacher"
    result = generate_dataset(tiny_params(), out, tokenizer_dir=smollm2_tokenizer_dir, progress=False)
    return out, result


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _shard_copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for path in dataset.shard_paths(folder):
        (to / path.name).write_bytes(path.read_bytes())
    return to


def test_same_params_give_byte_identical_shards_and_hash_with_one_or_two_workers(reference, tmp_path, smollm2_tokenizer_dir):
    out, result = reference
    again = generate_dataset(tiny_params(), tmp_path / "teacher", tokenizer_dir=smollm2_tokenizer_dir, workers=2, progress=False)
    assert _files(tmp_path / "teacher") == _files(out)
    assert again.manifest["digest"] == result.manifest["digest"]
    assert result.manifest["envs"]["pogs"]["episodes"] == 3 and result.manifest["envs"]["crafter"]["episodes"] == 2
    assert len(dataset.shard_paths(out)) == 5


def test_parquet_metadata_holds_no_timestamp(reference):
    out, _ = reference
    metadata = pq.ParquetFile(dataset.shard_paths(out)[0]).metadata
    assert metadata.created_by.startswith("parquet-cpp-arrow")
    assert set(metadata.metadata or {}) <= {b"ARROW:schema"}


def test_a_different_seed_gives_a_different_hash(reference, tmp_path, smollm2_tokenizer_dir):
    _, result = reference
    other = generate_dataset(tiny_params(seed=7, crafter_episodes=0), tmp_path / "t", tokenizer_dir=smollm2_tokenizer_dir, progress=False)
    assert other.manifest["digest"] != result.manifest["digest"]


def test_rerun_keeps_finished_shards_and_regenerates_only_the_missing_one(reference, tmp_path, smollm2_tokenizer_dir):
    out, result = reference
    copy = _shard_copy(out, tmp_path / "teacher")
    missing = dataset.shard_paths(copy)[-1]
    missing.unlink()
    (copy / ".pogs-00002-leftover.parquet.123.tmp").write_bytes(b"half a shard from a killed run")
    kept = {p.name: p.stat().st_mtime_ns for p in dataset.shard_paths(copy)}
    rerun = generate_dataset(tiny_params(), copy, tokenizer_dir=smollm2_tokenizer_dir, progress=False)
    assert (rerun.generated_shards, rerun.reused_shards) == (1, 4)
    assert {p.name: p.stat().st_mtime_ns for p in dataset.shard_paths(copy) if p.name in kept} == kept
    assert rerun.manifest["digest"] == result.manifest["digest"]
    assert _files(copy) == _files(out)  # the leftover temp file is gone too


def test_changed_params_replace_every_stale_shard(reference, tmp_path, smollm2_tokenizer_dir):
    out, _ = reference
    copy = _shard_copy(out, tmp_path / "teacher")
    rerun = generate_dataset(tiny_params(crafter_max_steps=6, pogs_episodes=2), copy, tokenizer_dir=smollm2_tokenizer_dir, progress=False)
    crafter_names = {p.name for p in dataset.shard_paths(copy) if p.name.startswith("crafter")}
    assert crafter_names.isdisjoint({p.name for p in dataset.shard_paths(out)})  # regenerated
    assert rerun.reused_shards == 2  # the POGS shards do not depend on crafter_max_steps
    assert len(dataset.shard_paths(copy)) == 4
    table = dataset.read_table(copy)
    assert max(s for e, s in zip(table["env"].to_pylist(), table["step"].to_pylist()) if e == "crafter") < 6


def test_crafter_plan_styles_regenerate_only_the_crafter_shards_with_those_wordings(reference, tmp_path, smollm2_tokenizer_dir):
    out, result = reference
    copy = _shard_copy(out, tmp_path / "teacher")
    rerun = generate_dataset(tiny_params(crafter_plan_styles=["bullets"]), copy, tokenizer_dir=smollm2_tokenizer_dir, progress=False)
    assert rerun.reused_shards == 3  # the POGS shards do not depend on the Crafter wordings
    assert rerun.manifest["digest"] != result.manifest["digest"]
    table = dataset.read_table(copy)
    plans = [p for e, p in zip(table["env"].to_pylist(), table["plan_text"].to_pylist()) if e == "crafter" and p]
    assert plans and all(p.startswith("Plan:\n- ") for p in plans)
    with pytest.raises(ConfigError, match=r"generate\.crafter_plan_styles.*'sonnet'"):
        tiny_params(crafter_plan_styles=["sonnet"])


def test_killed_half_way_then_rerun_gives_the_uninterrupted_hash(tmp_path, smollm2_tokenizer_dir):
    """Starts generation in a subprocess (2 worker processes), kills its process group with
    SIGKILL as soon as the first shard is on disk, then runs it again to completion. Many small
    POGS shards, so that the kill lands half-way even when the machine is busy."""
    raw = tiny_raw(pogs_episodes=40)
    total_shards = 2 + 40
    result = generate_dataset(parse_params(raw), tmp_path / "reference", tokenizer_dir=smollm2_tokenizer_dir, progress=False)
    out = tmp_path / "teacher"
    script = (
        "import json, sys\n"
        "from dynaplan.config import parse_params\n"
        "from dynaplan.data.generation import generate_dataset\n"
        "generate_dataset(parse_params(json.loads(sys.argv[1])), sys.argv[2], tokenizer_dir=sys.argv[3], workers=2, progress=False)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(raw), str(out), str(smollm2_tokenizer_dir)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and dataset.shard_paths(out):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"generation ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    finished = dataset.shard_paths(out)
    assert 1 <= len(finished) < total_shards and not (out / dataset.MANIFEST).exists()
    rerun = generate_dataset(parse_params(raw), out, tokenizer_dir=smollm2_tokenizer_dir, progress=False)
    assert rerun.reused_shards == len(finished)
    assert rerun.manifest["digest"] == result.manifest["digest"]


def test_train_seeds_start_at_train_start_and_stay_below_eval_start():
    params = parse_params({"seeds": {"train_start": 10, "eval_start": 50}, "generate": {"crafter_episodes": 5, "pogs_episodes": 40}})
    assert train_seeds(params, "crafter") == list(range(10, 15))
    assert max(train_seeds(params, "pogs")) < params.seeds.eval_start
    with pytest.raises(ConfigError, match="seeds.eval_start"):
        parse_params({"seeds": {"train_start": 10, "eval_start": 30}, "generate": {"pogs_episodes": 40}})


def test_rows_hold_the_shared_prompt_and_protocol_target(reference, smollm2_tokenizer_dir):
    out, _ = reference
    rows = dataset.read_table(out).to_pylist()
    count = token_counter(str(smollm2_tokenizer_dir))
    params = tiny_params()
    for row in rows[:40]:
        messages = json.loads(row["messages"])
        assert messages[0]["content"].endswith(planning_instruction("dynamic"))
        history = [Turn(o, a) for o, a in json.loads(row["history"])]
        rules = messages[0]["content"][: -len("\n\n" + planning_instruction("dynamic"))]
        rebuilt = build_messages(
            rules=rules, mode="dynamic", observation=row["observation"], history=history,
            current_plan=row["current_plan"], history_len=params.prompt.history_len,
            max_tokens=params.prompt.max_prompt_tokens, count_tokens=count,
        )
        assert rebuilt == messages
        assert row["planned"] == row["target"].startswith("<plan>")
        assert row["target"].endswith(row["action"])
        assert (row["plan_tokens"] > 0) == row["planned"]
    assert rows[0]["step"] == 0 and rows[0]["planned"]  # every teacher plans on its first step
    assert {r["env"] for r in rows} == set(ENV_ORDER)


def test_naive_view_strips_every_plan_and_rebuilds_never_mode_prompts(reference):
    out, _ = reference
    table = dataset.read_table(out)
    naive = naive_view(table)
    assert naive.schema == table.schema and naive.num_rows == table.num_rows
    rows = naive.to_pylist()
    assert all(r["target"] == r["action"] for r in rows)
    assert not any(r["planned"] or r["plan_text"] or r["current_plan"] or r["plan_tokens"] for r in rows)
    assert all(r["variant"] == "naive" for r in rows)
    for row in rows:
        system, user = (m["content"] for m in json.loads(row["messages"]))
        assert system.endswith(planning_instruction("never"))
        assert "<plan>" not in system + user and "Current plan:" not in user
    assert naive_view(table.to_pylist()[:3]) == naive.slice(0, 3)
    assert not any(p.name.startswith("naive") for p in out.iterdir())  # a view, not a copy
