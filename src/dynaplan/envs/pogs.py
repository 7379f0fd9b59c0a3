"""POGS (partially observable graph search) as a gymnasium text env, and its symbolic explorer.

A random labelled tree, a start and a target; the agent sees the nodes within `k` hops and keeps
no memory; it moves to a neighbour by naming its id. "Hard" mode keeps only graphs on which the
memory explorer must backtrack. No plotting or LLM logic here.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Any

import gymnasium
import networkx as nx
import numpy as np
from gymnasium import spaces

REACHED_FEEDBACK = "You have reached the target!"
INVALID_FEEDBACK = "Invalid Move!"
TARGET_REWARD = 100.0
INVALID_REWARD = -1.0


def visible_ball(graph: nx.Graph, node: int, k: int) -> tuple[list[int], list[list[int]]]:
    """Nodes within `k` hops of `node` and the edges among them (sorted, as [a, b] with a < b)."""
    nodes = sorted(nx.single_source_shortest_path_length(graph, node, cutoff=k))
    inside = set(nodes)
    edges = sorted([min(a, b), max(a, b)] for a, b in graph.edges(nodes) if a in inside and b in inside)
    return nodes, edges


def render_observation(visible_edges: Iterable[Iterable[int]], current: int, target: int, feedback: str | None = None) -> str:
    """The BALROG-fork text: one `node: i, neighbors: [...]` line per visible node with an edge,
    a blank line, `current node: c, target node: t`, then the feedback of the last move if any."""
    adjacency: dict[int, list[int]] = {}
    for a, b in visible_edges:
        adjacency.setdefault(a, []).append(b)
        adjacency.setdefault(b, []).append(a)
    lines = [f"node: {node}, neighbors: [{', '.join(map(str, sorted(adjacency[node])))}]" for node in sorted(adjacency)]
    text = "\n".join(lines) + f"\n\ncurrent node: {current}, target node: {target}"
    return f"{text}\n{feedback}" if feedback else text


class FrontierExplorer:
    """The symbolic memory agent: remembers every edge it has seen; goes to the target as soon as
    a path to it is known, otherwise to the nearest frontier node (a known node that is not yet
    within k-1 hops of a visited node, so it may hide unseen branches); ties go to the lower id.

    `backtracks` counts backtracking segments as gym-pogs' hard filter does: +1 each time it
    enters an already-visited node while not already backtracking.

    With `k=None` the radius is read off the observations: the deepest visible node is k hops
    away, unless the whole tree is in view (and then a smaller k changes nothing).
    """

    def __init__(self, k: int | None) -> None:
        self.infer_k = k is None
        self.k = 0 if k is None else k
        self.known = nx.Graph()
        self.visited: set[int] = set()
        self.explored: set[int] = set()
        self.backtracks = 0
        self.backtracking = False
        self.current: int | None = None
        self.target: int | None = None

    def observe(self, current: int, target: int, visible_edges: Iterable[Iterable[int]]) -> None:
        edges = [tuple(edge) for edge in visible_edges]
        if self.infer_k:
            view = nx.Graph(edges)
            view.add_node(current)
            self.k = max(self.k, 1, *nx.single_source_shortest_path_length(view, current).values())
        self.known.add_node(current)
        self.known.add_edges_from(edges)
        if current != self.current and self.current is not None:
            if current in self.visited:
                if not self.backtracking:
                    self.backtracks += 1
                self.backtracking = True
            else:
                self.backtracking = False
        self.current, self.target = current, target
        self.visited.add(current)
        # Every node within k-1 hops of where we stand has all its neighbours in view.
        self.explored.update(nx.single_source_shortest_path_length(self.known, current, cutoff=self.k - 1))

    def frontier(self) -> list[int]:
        return sorted(set(self.known.nodes) - self.explored)

    def route(self) -> tuple[list[int], int | None]:
        """The path (current first) the explorer will follow, and the frontier node it heads to
        (None when it heads to the target). An empty path when there is nowhere left to go."""
        if self.target in self.known:
            return nx.shortest_path(self.known, self.current, self.target), None
        distances, paths = nx.single_source_dijkstra(self.known, self.current)
        candidates = [node for node in self.frontier() if node in distances and node != self.current]
        if not candidates:
            return [], None
        goal = min(candidates, key=lambda node: (distances[node], node))
        return paths[goal], goal

    def next_node(self) -> int | None:
        path, _ = self.route()
        return path[1] if len(path) > 1 else None


def explorer_rollout(graph: nx.Graph, start: int, target: int, k: int, max_steps: int) -> tuple[bool, int, int]:
    """Run the explorer on a graph: (reached the target, steps taken, backtracks)."""
    explorer = FrontierExplorer(k)
    current = start
    for step in range(max_steps):
        explorer.observe(current, target, visible_ball(graph, current, k)[1])
        nxt = explorer.next_node()
        if nxt is None:
            return False, step, explorer.backtracks
        current = nxt
        if current == target:
            explorer.observe(current, target, visible_ball(graph, current, k)[1])
            return True, step + 1, explorer.backtracks
    return False, max_steps, explorer.backtracks


def pogs_rules(num_nodes: int, k: int, max_steps: int) -> str:
    """The POGS instruction (BALROG fork, paraphrased) without the output-format part."""
    return (
        f"You are an agent navigating POGS, a partially observable graph search. The graph is a tree "
        f"of {num_nodes} nodes numbered 0 to {num_nodes - 1}; your task is to find and reach the "
        f"target node within {max_steps} moves.\n"
        f"Each observation lists the nodes within {k} hops of you with their visible neighbors "
        f"(an adjacency list), then your current node and the target node. You do not see farther "
        f"and nothing is remembered for you: the target may be out of sight.\n"
        f"Valid actions: the number of a node directly connected to your current node (one of "
        f"0..{num_nodes - 1}). Naming any other node, or your own, is an invalid move: you stay "
        f"where you are and lose a point. Reaching the target earns 100 points and ends the game.\n"
        f"A node with a single neighbor that is closer than {k} hops is a dead end: do not walk "
        f"into it unless it is the target."
    )


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < minimum:
        raise ValueError(f"POGS {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class PogsEnv(gymnasium.Env):
    """POGS with text observations; see the module docstring and `dynaplan.envs`.

    `default_action` is the current node's id: staying in place is not a move, so the fallback
    for an unparseable answer counts as an invalid move (-1), as any wrong answer would.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        num_nodes: int = 20,
        k: int = 2,
        max_steps: int = 30,
        hard: bool = True,
        min_backtracks: int = 1,
        max_attempts: int = 1000,
    ) -> None:
        self.num_nodes = _check_int("num_nodes", num_nodes, 2)
        self.k = _check_int("k", k, 1)
        self.max_steps = _check_int("max_steps", max_steps, 1)
        self.min_backtracks = _check_int("min_backtracks", min_backtracks, 0)
        self.max_attempts = _check_int("max_attempts", max_attempts, 1)
        self.hard = bool(hard)
        self.action_names: tuple[str, ...] = tuple(str(i) for i in range(self.num_nodes))
        self._name_index = {name: i for i, name in enumerate(self.action_names)}
        self.action_space = spaces.Discrete(self.num_nodes)
        digits = len(str(self.num_nodes - 1))
        # One line per node, 2(N-1) neighbour entries, the current/target line and feedback.
        max_chars = self.num_nodes * (24 + digits) + 2 * (self.num_nodes - 1) * (digits + 2) + 96 + digits * 2
        self.observation_space = spaces.Text(max_length=max_chars, charset=string.printable)
        self.graph: nx.Graph | None = None
        self.current = self.target = self.start = -1
        self._step = 0
        self._total_reward = 0.0
        self._done = True
        self._reached_at: int | None = None

    @property
    def rules(self) -> str:
        return pogs_rules(self.num_nodes, self.k, self.max_steps)

    @property
    def default_action(self) -> str:
        return str(self.current)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None and (
            not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or seed < 0
        ):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r} ({type(seed).__name__})")
        super().reset(seed=None if seed is None else int(seed))
        for _ in range(self.max_attempts):
            graph, start, target = self._draw()
            if not self.hard:
                break
            _, _, backtracks = explorer_rollout(graph, start, target, self.k, self.max_steps)
            if backtracks >= self.min_backtracks:
                break
        else:
            raise RuntimeError(
                f"no POGS graph with num_nodes={self.num_nodes}, k={self.k}, max_steps={self.max_steps} "
                f"made the explorer backtrack >= {self.min_backtracks} times in {self.max_attempts} draws; "
                "lower min_backtracks or k, or raise num_nodes or max_attempts"
            )
        self.graph, self.start, self.current, self.target = graph, start, start, target
        self._step = 0
        self._total_reward = 0.0
        self._done = False
        self._reached_at = None
        return self._observe(None)

    def _draw(self) -> tuple[nx.Graph, int, int]:
        rng = self.np_random
        tree = nx.random_labeled_tree(self.num_nodes, seed=int(rng.integers(0, 2**31 - 1)))
        # random_labeled_tree already labels 0..N-1; relabelling keeps that a guarantee.
        tree = nx.convert_node_labels_to_integers(tree, ordering="sorted")
        start = int(rng.integers(self.num_nodes))
        target = int(rng.integers(self.num_nodes - 1))
        target += target >= start  # uniform over the other nodes
        return tree, start, target

    def action_index(self, action: Any) -> int:
        """A node id from an index (int or numpy integer) or its string ("7")."""
        if isinstance(action, (int, np.integer)) and not isinstance(action, (bool, np.bool_)):
            if 0 <= int(action) < self.num_nodes:
                return int(action)
        elif isinstance(action, str) and action in self._name_index:
            return self._name_index[action]
        raise ValueError(
            f"unknown POGS action {action!r}; expected a node id 0..{self.num_nodes - 1} as an int or a string like '7'"
        )

    def step(self, action):
        node = self.action_index(action)
        if self._done:
            raise RuntimeError("the episode is over; call reset() before step()")
        self._step += 1
        if node in self.graph[self.current]:
            self.current = node
            reward, feedback = 0.0, None
        else:
            reward, feedback = INVALID_REWARD, INVALID_FEEDBACK
        terminated = self.current == self.target
        if terminated:
            reward, feedback = TARGET_REWARD, REACHED_FEEDBACK
            self._reached_at = self._step
        self._total_reward += reward
        truncated = not terminated and self._step >= self.max_steps
        self._done = terminated or truncated
        obs, info = self._observe(feedback)
        return obs, reward, terminated, truncated, info

    def _observe(self, feedback: str | None) -> tuple[str, dict[str, Any]]:
        _, edges = visible_ball(self.graph, self.current, self.k)
        obs = render_observation(edges, self.current, self.target, feedback)
        info = {
            "current_node": self.current,
            "target_node": self.target,
            "neighbors": sorted(int(n) for n in self.graph[self.current]),
            "visible_edges": edges,
            "step": self._step,
            "achievements": {} if self._reached_at is None else {"reach_target": self._reached_at},
            "progression": max(0.0, self._total_reward / TARGET_REWARD),
            "history_text": obs,
        }
        return obs, info
