"""`dynaplan play`: the game loop with a person's typed lines, the expert and the seeded random
player, and the command's summary and usage errors."""

from __future__ import annotations

import io

import networkx as nx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from dynaplan.agent.play import play, summary_table
from dynaplan.cli import app
from dynaplan.envs.pogs import PogsEnv


def typed(lines):
    queue = list(lines)

    def read_line(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read_line


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=100)


def test_a_person_can_write_a_plan_and_walk_to_the_pogs_target():
    env = PogsEnv()
    _, info = env.reset(seed=7)
    path = nx.shortest_path(env.graph, info["current_node"], info["target_node"])
    lines = ["?", "plan walk to the target", "fly away", *map(str, path[1:])]
    result = play("pogs", "human", 7, read_line=typed(lines), console=quiet_console())
    assert (result.outcome, result.steps, result.plans_written) == ("terminated", len(path) - 1, 1)
    assert result.current_plan == "walk to the target" and result.progression == 1.0


def test_a_person_can_use_names_in_any_case_or_numbers_and_quit():
    result = play("crafter", "human", 0, read_line=typed(["move west", "3", "Do", "quit"]), console=quiet_console())
    assert (result.outcome, result.steps) == ("quit", 3)
    assert play("pogs", "human", 0, read_line=typed([]), console=quiet_console()).outcome == "quit"  # EOF


def test_the_expert_reaches_the_pogs_target_and_writes_plans():
    result = play("pogs", "expert", 3, console=quiet_console(), show=False)
    assert result.outcome == "terminated" and result.plans_written >= 1
    assert "reach_target" in result.achievements


def test_the_random_player_is_seeded():
    runs = [play("pogs", "random", 5, console=quiet_console(), show=False) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].invalid_moves > 0


def test_unknown_policy_or_env_raises_before_playing():
    with pytest.raises(ValueError, match="unknown policy"):
        play("pogs", "bot", 0)
    with pytest.raises(ValueError, match="unknown env"):
        play("chess", "random", 0)


def test_summary_lists_steps_progression_plans_and_achievements():
    result = play("pogs", "expert", 3, console=quiet_console(), show=False)
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(summary_table(result))
    text = console.export_text()
    assert "plans written" in text and "progression" in text and "reach_target (step" in text


def test_cli_play_prints_the_summary_and_rejects_bad_options():
    runner = CliRunner()
    ok = runner.invoke(app, ["play", "--env", "pogs", "--policy", "random", "--seed", "2", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert "plans written" in ok.output
    assert runner.invoke(app, ["play", "--env", "chess"]).exit_code == 2
    assert runner.invoke(app, ["play", "--policy", "bot"]).exit_code == 2
