"""The scripted POGS teacher: the frontier explorer with memory, writing truthful plans at random
intervals in varied wording (the SFT data's plan diversity).

It sees only what the agent sees (each observation's visible edges, the current and target
node) and its own memory of them; never the hidden graph.
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from dynaplan.envs.pogs import FrontierExplorer
from dynaplan.teachers import TeacherStep

# Each style words the three situations the explorer can be in:
#   (target known: walk the path to it,
#    exploring: head for the nearest unexplored frontier node,
#    backtracking: the way to that frontier runs back through visited nodes).
# Fields: {target}, {current}, {next}, {goal}, {route} (the next nodes, "a -> b -> c"), {moves}
# ("3 moves"). The backtracking wording is used only when every unexplored node lies back
# the way the explorer came, so that "this branch is explored" is true.
PLAN_STYLES: tuple[tuple[str, str, str], ...] = (
    (
        "The target {target} is in my map. I will follow {route} and reach it in {moves}.",
        "The target {target} is not visible yet. I will explore toward node {goal}, the nearest unexplored branch, through {next}, and backtrack if it is a dead end.",
        "The branch around node {current} is fully explored and holds no target. I will backtrack through {route} to reach node {goal}, the nearest unexplored branch.",
    ),
    (
        "I know the way to {target}: {route}. Next move: {next}.",
        "No sign of {target} yet. Next I go to {next}, heading for unexplored node {goal}.",
        "Dead end here. Going back to {next}, then on to unexplored node {goal}.",
    ),
    (
        "Goal: node {target}. Path found ({moves}): {route}. I will walk it without detours.",
        "Goal: node {target}, still out of sight. Step 1: move to {next}. Step 2: keep going to {goal}, where unseen nodes may start. Step 3: if it is a dead end, return and try the next branch.",
        "Goal: node {target}, still out of sight. This branch is exhausted, so step 1: go back to {next}; step 2: continue to {goal}, the closest unexplored node.",
    ),
    (
        "Target {target} spotted. Shortest route from {current}: {route}.",
        "Target {target} unseen. Exploring: {route}, toward the frontier at {goal}.",
        "Backtracking: {route}, toward the frontier at {goal}; everything near {current} is explored.",
    ),
    (
        "Since the target {target} is now connected to what I have seen, I will move {route} ({moves}).",
        "Since the target {target} is nowhere in what I have seen, I will check the closest unexplored part of the tree, at node {goal}, moving to {next} first.",
        "Since every node around {current} is explored and none is {target}, I will retrace my steps to {next} and continue to {goal}.",
    ),
    (
        "Plan: reach {target} via {route}. The path is known, so no more exploring is needed.",
        "Plan: explore. Move to {next}, continue to {goal}, and look for {target} from there.",
        "Plan: backtrack. Return to {next} and continue to the unexplored node {goal} to look for {target}.",
    ),
    (
        "{target} is {moves} away along {route}. Going straight there.",
        "{target} is out of view. The nearest node with unexplored neighbors is {goal}; I head there through {next}.",
        "Node {current} leads nowhere new. The nearest node with unexplored neighbors is {goal}; I head back there through {next}.",
    ),
    (
        "Now that I know how to reach node {target}, I will take the path {route}.",
        "I cannot see node {target}. I will scout the unexplored branch at node {goal}, starting with a move to {next}, and turn back if it ends.",
        "I hit a dead end without finding node {target}. I will turn back to {next} and scout the unexplored branch at node {goal}.",
    ),
    (
        "Path to target: {route}. First move: {next}.",
        "Target: not found yet. Exploring toward: {goal}. First move: {next}.",
        "Target: not found yet. Backtracking toward: {goal}. First move: {next}.",
    ),
    (
        "My map connects {current} to the target {target}. I'll go {route}, which takes {moves}.",
        "My map does not contain {target} yet. I'll go toward {goal}, the closest spot I haven't explored, via {next}.",
        "My map shows nothing left to see past {current}. I'll go back via {next} toward {goal}, the closest spot I haven't explored.",
    ),
    (
        "Head for {target}: {route}. Keep to this path.",
        "Search for {target}: visit the unexplored area past {goal}, going through {next}. If it is a dead end, come back.",
        "Search for {target} continues elsewhere: retreat to {next}, then push on to {goal}.",
    ),
    (
        "The route to {target} is clear: {route}. I will move to {next} now.",
        "The route to {target} is unknown, so I will uncover more of the graph by moving toward node {goal} ({next} first).",
        "The route to {target} is still unknown and this side is explored, so I will move back toward node {goal} ({next} first).",
    ),
    (
        "I will follow the known path {route} to the target {target}.",
        "I will explore the branch at {goal} next, moving to {next}, because the target {target} has not appeared in any node I have seen.",
        "I will backtrack to {next} and then explore the branch at {goal}, because the nodes near {current} are all seen and the target {target} is not among them.",
    ),
    (
        "Target located. Moves: {route}. Expect to arrive in {moves}.",
        "Target hidden. Closest frontier: node {goal}. Moving: {route}.",
        "Dead end confirmed at {current}. Returning along {route} to the frontier node {goal}.",
    ),
    (
        "With {target} on my map, the job is simple: walk {route}.",
        "With {target} not visible, I need to explore: the unexplored node closest to me is {goal}, so I go {route}.",
        "With this branch explored and {target} not found, I need to go back: {route}, toward unexplored node {goal}.",
    ),
    (
        "Next: step to {next}, then keep on the path {route} to {target}.",
        "Next: step to {next} and keep going to {goal}, the nearest node whose branches I have not seen; {target} may lie beyond it.",
        "Next: step back to {next} and keep going to {goal}, the nearest node whose branches I have not seen; {target} is not on this side.",
    ),
    (
        "Reaching {target} now needs only the known path: {route}.",
        "To find {target}, I will look past node {goal}, the nearest unexplored node, moving through {next}. I remember the way back if it ends.",
        "To find {target}, I must leave this explored branch: back through {next}, then on to node {goal}.",
    ),
    (
        "The target {target} is reachable: {moves} via {route}.",
        "The target {target} is not in sight; I will check node {goal} first, since it is the closest unexplored node, going via {next}.",
        "The target {target} is not past {current}; I will go back via {next} and check node {goal}, the closest unexplored node.",
    ),
)


class PogsExpert:
    """Frontier explorer with memory and plans at random intervals (see `dynaplan.teachers`).

    `k` is the env's visibility radius (which seen nodes have all their neighbours in view);
    None (the default) reads it off the first observation, as an agent could.
    """

    def __init__(self, *, seed: int, plan_interval_min: int = 2, plan_interval_max: int = 12, k: int | None = None) -> None:
        if not 1 <= plan_interval_min <= plan_interval_max:
            raise ValueError(
                f"plan intervals must satisfy 1 <= plan_interval_min <= plan_interval_max, got {plan_interval_min}, {plan_interval_max}"
            )
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1 or None, got {k}")
        self.seed = seed
        self.plan_interval_min = plan_interval_min
        self.plan_interval_max = plan_interval_max
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.explorer = FrontierExplorer(k)
        self.steps_to_plan = 0

    def reset(self, observation: str, info: dict) -> None:
        # The generator carries over across episodes; each episode starts with a plan.
        self.explorer = FrontierExplorer(self.k)
        self.steps_to_plan = 0

    def act(self, observation: str, info: dict) -> TeacherStep:
        current, target = int(info["current_node"]), int(info["target_node"])
        self.explorer.observe(current, target, info["visible_edges"])
        path, goal = self.explorer.route()
        if len(path) > 1:
            action = str(path[1])
        else:  # nothing left to explore in memory (not reachable on a tree): try a neighbour
            neighbors = sorted(info["neighbors"])
            action = str(neighbors[0] if neighbors else current)
            path, goal = [current, int(action)], int(action)
        if self.steps_to_plan > 0:
            self.steps_to_plan -= 1
            return TeacherStep(action=action)
        interval = int(self.rng.integers(self.plan_interval_min, self.plan_interval_max + 1))
        self.steps_to_plan = interval - 1
        return TeacherStep(action=action, plan=self._plan(path, goal, current, target), plan_interval=interval)

    def _plan(self, path: list[int], goal: int | None, current: int, target: int) -> str:
        style = PLAN_STYLES[int(self.rng.integers(len(PLAN_STYLES)))]
        if goal is None:
            template = style[0]
        elif self._branch_exhausted(path[1]):
            template = style[2]
        else:
            template = style[1]
        shown = path[1:4]
        route = " -> ".join(map(str, shown)) + (" -> ..." if len(path) > 4 else "")
        return template.format(
            target=target, current=current, next=path[1], goal=goal, route=route,
            moves=f"{len(path) - 1} move{'s' if len(path) > 2 else ''}",
        )

    def _branch_exhausted(self, next_node: int) -> bool:
        """True when the next node was visited and every frontier node lies back through it."""
        explorer = self.explorer
        if next_node not in explorer.visited:
            return False
        paths = nx.single_source_shortest_path(explorer.known, explorer.current)
        return all(paths[node][1] == next_node for node in explorer.frontier() if node in paths and len(paths[node]) > 1)
