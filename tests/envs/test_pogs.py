"""PogsEnv: the tree, the k-hop text view, rewards and caps, the hard filter, validation,
check_env and determinism."""

from __future__ import annotations

import networkx as nx
import pytest
from gymnasium.utils.env_checker import check_env

from dynaplan.envs import make_env
from dynaplan.envs.pogs import (
    FrontierExplorer,
    PogsEnv,
    explorer_rollout,
    render_observation,
    visible_ball,
)


def path_graph(n: int) -> nx.Graph:
    return nx.path_graph(n)


def test_text_lists_each_visible_node_with_its_visible_neighbours_then_current_and_target():
    text = render_observation([[1, 2], [0, 1], [2, 3]], current=1, target=9)
    assert text == (
        "node: 0, neighbors: [1]\nnode: 1, neighbors: [0, 2]\nnode: 2, neighbors: [1, 3]\n"
        "node: 3, neighbors: [2]\n\ncurrent node: 1, target node: 9"
    )
    assert render_observation([[0, 1]], 0, 1, "Invalid Move!").endswith("target node: 1\nInvalid Move!")


def test_visible_ball_holds_nodes_within_k_hops_and_edges_among_them():
    nodes, edges = visible_ball(path_graph(7), 3, 2)
    assert nodes == [1, 2, 3, 4, 5]
    assert edges == [[1, 2], [2, 3], [3, 4], [4, 5]]


def test_reset_draws_a_tree_on_0_to_n_minus_1_with_distinct_start_and_target():
    env = PogsEnv(num_nodes=20, hard=False)
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        assert nx.is_tree(env.graph) and sorted(env.graph.nodes) == list(range(20))
        assert info["current_node"] != info["target_node"]
        assert obs == info["history_text"] and env.observation_space.contains(obs)
        assert info["neighbors"] == sorted(env.graph[info["current_node"]])
        assert obs.endswith(f"current node: {info['current_node']}, target node: {info['target_node']}")


def test_invalid_move_costs_one_and_stays_valid_move_is_free():
    env = PogsEnv(hard=False)
    _, info = env.reset(seed=3)
    here = info["current_node"]
    stranger = next(n for n in range(20) if n not in info["neighbors"] and n != here)
    obs, reward, terminated, truncated, info = env.step(stranger)
    assert (reward, terminated, info["current_node"]) == (-1.0, False, here)
    assert obs.endswith("Invalid Move!")
    obs, reward, *_ , info = env.step(env.default_action)  # staying put is not a move
    assert reward == -1.0 and info["current_node"] == here
    neighbour = info["neighbors"][0]
    if neighbour != info["target_node"]:
        _, reward, _, _, info = env.step(str(neighbour))
        assert reward == 0.0 and info["current_node"] == neighbour
    assert info["progression"] == 0.0  # max(0, -2 / 100)


def test_reaching_the_target_pays_100_terminates_and_records_the_step():
    env = PogsEnv(hard=False)
    _, info = env.reset(seed=4)
    path = nx.shortest_path(env.graph, info["current_node"], info["target_node"])
    env.step(info["current_node"])  # one invalid move first: progression becomes 0.99
    for node in path[1:]:
        obs, reward, terminated, truncated, info = env.step(node)
    assert (reward, terminated, truncated) == (100.0, True, False)
    assert obs.endswith("You have reached the target!")
    assert info["achievements"] == {"reach_target": len(path)}
    assert info["progression"] == pytest.approx(0.99)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(path[-2])


def test_episode_is_truncated_at_max_steps():
    env = PogsEnv(max_steps=3, hard=False)
    _, info = env.reset(seed=1)
    results = [env.step(info["current_node"])[2:4] for _ in range(3)]
    assert results == [(False, False), (False, False), (False, True)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"k": 0}, "k must be an int >= 1"), ({"num_nodes": 1}, "num_nodes must be an int >= 2"),
     ({"max_steps": 0}, "max_steps"), ({"k": 1.5}, "k must be an int"), ({"min_backtracks": -1}, "min_backtracks")],
)
def test_invalid_sizes_raise_value_error_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        PogsEnv(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(err.value)


@pytest.mark.parametrize("action", [20, -1, "20", "node 3", "03", 2.0, True, None])
def test_unknown_action_raises_value_error(action):
    env = PogsEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="unknown POGS action"):
        env.step(action)


@pytest.mark.parametrize("seed", ["7", 7.0, -1])
def test_wrong_seed_raises_value_error(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        PogsEnv().reset(seed=seed)


def test_impossible_hard_setting_fails_with_a_clear_error_instead_of_hanging():
    # Two nodes: the start is next to the target, nobody ever backtracks.
    env = PogsEnv(num_nodes=2, min_backtracks=1, max_attempts=50)
    with pytest.raises(RuntimeError, match="min_backtracks"):
        env.reset(seed=0)


def test_explorer_counts_backtracking_segments_not_steps():
    # A star: centre 0 with leaves 1..3 and the target far away behind leaf 3.
    graph = nx.Graph([(0, 1), (0, 2), (0, 3), (3, 4), (4, 5), (5, 6)])
    explorer = FrontierExplorer(k=1)
    for node in (0, 1, 0, 2, 0, 3):  # two excursions into dead ends, each one backtracking segment
        explorer.observe(node, 6, visible_ball(graph, node, 1)[1])
    assert explorer.backtracks == 2


def test_explorer_goes_straight_to_a_known_target():
    graph = path_graph(6)
    reached, steps, backtracks = explorer_rollout(graph, 0, 5, k=2, max_steps=30)
    assert (reached, steps, backtracks) == (True, 5, 0)


def test_hard_episodes_make_the_explorer_backtrack_at_least_min_backtracks():
    env = PogsEnv(min_backtracks=2)
    for seed in range(10):
        _, info = env.reset(seed=seed)
        _, _, backtracks = explorer_rollout(env.graph, info["current_node"], info["target_node"], 2, 30)
        assert backtracks >= 2


def test_same_seed_gives_the_same_episode_and_different_seeds_differ():
    def episode(seed):
        env = make_env("pogs")
        obs, info = env.reset(seed=seed)
        trace = [obs]
        for action in (info["neighbors"][0], 0, 5):
            obs, reward, terminated, truncated, info = env.step(action)
            trace.append((obs, reward, terminated))
            if terminated:
                break
        return trace

    assert episode(11) == episode(11)
    assert episode(11) != episode(12)


def test_check_env_passes():
    check_env(PogsEnv(), skip_render_check=True)


def test_rules_state_size_radius_and_horizon():
    rules = PogsEnv(num_nodes=15, k=3, max_steps=40).rules
    assert "15 nodes" in rules and "within 3 hops" in rules and "40 moves" in rules
