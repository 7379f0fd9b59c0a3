"""The Great Expectations gate: a clean teacher dataset passes; each kind of corruption is caught
and named with its rows, through the same code path as the `validate` stage."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from dynaplan.config import parse_params
from dynaplan.data import dataset
from dynaplan.data.expectations import chat_token_counter, env_action_sets, validate_dataset
from dynaplan.data.generation import generate_dataset
from dynaplan.data.schema import to_table

RAW = {
    "envs": {"crafter": {"area": 32}},
    "generate": {"crafter_episodes": 1, "crafter_max_steps": 14, "pogs_episodes": 2, "episodes_per_shard": 2, "workers": 1},
}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, smollm2_tokenizer_dir):
    out = tmp_path_factory.mktemp("validate") / "teacher"
    generate_dataset(parse_params(RAW), out, tokenizer_dir=smollm2_tokenizer_dir, progress=False)
    return out


def test_a_clean_teacher_dataset_passes_every_expectation_and_gets_data_docs(teacher_dir, smollm2_tokenizer_dir, tmp_path):
    params = parse_params(RAW)
    report = validate_dataset(
        dataset.read_table(teacher_dir), params, action_sets=env_action_sets(params),
        count_seq_tokens=chat_token_counter(smollm2_tokenizer_dir), docs_dir=tmp_path / "docs",
    )
    assert report.success, report.failure_message()
    summary = report.summary()
    names = set(summary["expectations"])
    for expected in (
        "target_matches_protocol.crafter", "target_matches_protocol.pogs", "action_in_action_set.pogs",
        "plan_tags_balanced", "plan_length_within_bounds", "planned_agrees_with_target",
        "plan_interval_within_range", "not_null.reward", "unique_episode_step",
        "seq_within_max_seq_len", "train_seeds_disjoint_from_eval",
    ):
        assert summary["expectations"][expected] == {"success": True, "unexpected_count": 0}, expected
    assert len(names) == len(report.outcomes)
    assert (tmp_path / "docs" / "index.html").is_file()


def _corrupt(rows: list[dict]) -> dict[str, tuple[str, int]]:
    """Damage one row per kind; returns {expectation name: (episode_id, step) of the bad row}."""
    crafter = [r for r in rows if r["env"] == "crafter"]
    planned = next(r for r in crafter if r["planned"])
    planned["target"] = planned["target"].replace("</plan>\n", "\n")  # an unclosed <plan>
    plain = next(r for r in crafter if not r["planned"])
    plain["action"] = plain["target"] = "Fly Away"  # not a Crafter action
    nulled = crafter[-1]
    nulled["reward"] = None
    pogs = [r for r in rows if r["env"] == "pogs"]
    pogs[1]["seed"] = 1_000_001  # a held-out evaluation seed (seeds.eval_start = 1,000,000)
    pogs[2]["plan_interval"] = 99
    rows.append(dict(pogs[3]))  # a duplicate (episode, step)
    key = lambda r: (r["episode_id"], r["step"])  # noqa: E731
    return {
        "target_matches_protocol.crafter": key(planned),
        "plan_tags_balanced": key(planned),
        "action_in_action_set.crafter": key(plain),
        "not_null.reward": key(nulled),
        "train_seeds_disjoint_from_eval": key(pogs[1]),
        "plan_interval_within_range": key(pogs[2]),
        "unique_episode_step": key(pogs[3]),
    }


def test_a_corrupted_shard_fails_the_validate_stage_naming_each_expectation_and_row(
    teacher_dir, smollm2_tokenizer_dir, tmp_path, monkeypatch, capsys
):
    from tasks import validate as validate_task

    project = tmp_path / "project"
    shutil.copytree(teacher_dir, project / "data" / "teacher")
    (project / "params.yaml").write_text(yaml.safe_dump({**RAW, "model": {"dir": str(smollm2_tokenizer_dir)}}))
    shard = dataset.shard_paths(project / "data" / "teacher")[0]
    rows = dataset.read_table(project / "data" / "teacher").to_pylist()
    bad = _corrupt(rows)
    for path in dataset.shard_paths(project / "data" / "teacher"):
        path.unlink()
    dataset.write_shard(to_table(rows), shard)
    before = shard.read_bytes()

    monkeypatch.chdir(project)
    monkeypatch.setenv("DYNAPLAN_ROOT", str(project))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SystemExit) as exit_info:
        validate_task.main()
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    summary = json.loads((project / "reports" / "validate" / "summary.json").read_text())
    assert summary["success"] is False
    for name, (episode_id, step) in bad.items():
        assert summary["expectations"][name]["success"] is False, name
        assert summary["expectations"][name]["unexpected_count"] >= 1
        failed_line = next(line for line in message.splitlines() if f"FAILED {name} " in line)
        examples = message.split(failed_line, 1)[1]
        assert f"episode_id='{episode_id}', step={step}" in examples.split("FAILED", 1)[0], name
    assert summary["expectations"]["target_matches_protocol.pogs"]["success"] is True
    assert (project / "reports" / "validate" / "data_docs" / "index.html").is_file()
    assert shard.read_bytes() == before  # validation never touches the data
