"""Scripted Crafter player that writes natural-language plans at random intervals (SFT teacher).

It decides only from what the agent itself could know: the 9x7 views it has seen (its own map,
`CrafterMap`), its status, inventory, facing, position and the achievements it was rewarded for.
It must never read the env's hidden world state (no env internals, no whole-world semantic map).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import crafter.constants
import numpy as np

from dynaplan.teachers import TeacherStep
from dynaplan.teachers.crafter_map import (
    CODE,
    DIRECTIONS,
    NAME,
    SOLID,
    UNKNOWN,
    VOID,
    WALKABLE,
    WALKABLE_GUESS,
    CrafterMap,
)
from dynaplan.teachers.crafter_plans import SubGoal, style_indices, write_plan

TREE, WATER, STONE, LAVA = CODE["tree"], CODE["water"], CODE["stone"], CODE["lava"]
COAL, IRON, DIAMOND = CODE["coal"], CODE["iron"], CODE["diamond"]
TABLE, FURNACE, GRASS, PATH = CODE["table"], CODE["furnace"], CODE["grass"], CODE["path"]
# Where Place Stone / Table / Furnace / Plant may put their thing (crafter's rules, data.yaml).
PLACE_WHERE = {
    name: frozenset(CODE[m] for m in info["where"]) | ({WALKABLE_GUESS} if "grass" in info["where"] and name != "plant" else set())
    for name, info in crafter.constants.place.items()
}
PLACE_USES = {name: dict(info["uses"]) for name, info in crafter.constants.place.items()}
MAKE_USES = {name: dict(info["uses"]) for name, info in crafter.constants.make.items()}
MINE_TOOL = {STONE: "wood_pickaxe", COAL: "wood_pickaxe", IRON: "stone_pickaxe", DIAMOND: "iron_pickaxe"}
# Extra path cost of stepping into a creature's cell (0 = never): cows and enemies are hit
# out of the way, an arrow passes.
CREATURE_COST = {"cow": 3, "zombie": 3, "skeleton": 3, "arrow": 2}
# Objects only update within this Manhattan distance of the player (crafter's env.step), so a
# sapling grows only while the player stays near; it is ripe after 300 updates (objects.Plant).
PLANT_UPDATE_DISTANCE = 18
PLANT_RIPE_UPDATES = 330


def describe_offset(dx: int, dy: int) -> str:
    """'2 steps north and 1 step east' (north/south first, as the text observation writes it)."""
    parts = []
    if dy:
        parts.append(f"{abs(dy)} step{'s' if abs(dy) > 1 else ''} {'north' if dy < 0 else 'south'}")
    if dx:
        parts.append(f"{abs(dx)} step{'s' if abs(dx) > 1 else ''} {'west' if dx < 0 else 'east'}")
    return " and ".join(parts) if parts else "right here"


class CrafterExpert:
    """Priority-driven Crafter player: survive (fight, drink, eat, sleep walled in), then pursue the
    next achievement in the tech tree, exploring its remembered map when it lacks a resource."""

    # Survival settings, measured with benchmarks/crafter_expert.py on 20 seeds (progression
    # noise about +-0.03). Options left at 0/False were measured worse there: walling in to
    # rest when hurt, sleeping early at night, backing off skeletons, daylight stock-ups.
    rest_health = 0  # at or below: wall in and rest (0: never)
    rest_health_enemies = 0  # ... or at or below this with an enemy within 6 steps
    night_sleep_energy = 0  # sleep at night at or below this energy (0: only when tired)
    tired_energy = 3  # wall in and sleep at or below this energy
    food_urgent = 4  # go and find food at or below this, however far
    drink_urgent = 4  # same for water
    shelter_max_cost = 40  # how far a sleeping spot may be
    stay_while_zombies = True  # stay walled in while zombies are within 8 steps
    night_start, night_end = 140, 270  # steps into crafter's 300-step day when zombies crowd
    stay_at_night = False
    spare_wood = 2  # wood kept beyond the remaining tools' needs (a second table)
    wood_detour = 15  # how far a tree may be for a top-up
    grass_penalty = 4  # extra cost per grass tile on routes while zombies spawn
    zombie_time_start = 110  # steps into each 300-step day from which zombies spawn
    topup_level = 6  # in safe daylight, detour to known food/water at or below this
    stock_up_level = 0  # in safe daylight, go and search food/water at or below this (0: never)
    skeleton_flee_health = 0  # at or below: leave the range of visible skeletons (0: never)
    skeleton_hunt_health = 6  # at or above, with a stone sword: hit skeletons within 4 steps
    skeleton_avoid_radius = 3  # routes pay extra within this distance of a visible skeleton
    skeleton_avoid_cost = 4

    def __init__(
        self,
        *,
        seed: int,
        plan_interval_min: int = 2,
        plan_interval_max: int = 12,
        map_size: int = 64,
        plan_styles: Sequence[str] = (),
    ) -> None:
        if not 1 <= plan_interval_min <= plan_interval_max:
            raise ValueError(
                f"need 1 <= plan_interval_min <= plan_interval_max, got {plan_interval_min}..{plan_interval_max}"
            )
        self.seed = int(seed)
        self.plan_interval_min = plan_interval_min
        self.plan_interval_max = plan_interval_max
        self.map_size = map_size
        # the wordings plans are drawn from (generate.crafter_plan_styles; empty: all of them)
        self.plan_styles = style_indices(plan_styles)
        # One stream for plan timing and wording, one for the rare random moves of the policy, so
        # the wording never changes what the player does.
        self._plan_rng = np.random.default_rng([self.seed, 0])
        self._move_rng = np.random.default_rng([self.seed, 1])
        self._ready = False

    # ------------------------------------------------------------------ episode interface
    def reset(self, observation: str, info: dict[str, Any]) -> None:
        self.map = CrafterMap(self.map_size)
        self.t = 0
        self._steps_to_plan = 0
        self._explore_target: int | None = None
        self._explore_kind = ""
        self._shelter: tuple[int, tuple[int, int]] | None = None
        self._sleep_mode = False
        self._rest_mode = False
        self._drinking = False
        self._eating = False
        self._sapling_tries = 0
        self._plants: dict[int, int] = {}  # own plant cell -> updates it got while we were near
        self._pending_plant: int | None = None
        self._last_positions: list[int] = []
        self._chase_steps = 0
        self._avoid_grass = False
        self._danger_step = -1
        self._danger_cells: dict[int, int] = {}
        self.goal = SubGoal("start", "look around", "the game just started")
        self.last_plan: str | None = None
        self._ready = True
        self._observe(info)

    def act(self, observation: str, info: dict[str, Any]) -> TeacherStep:
        if not self._ready:
            raise RuntimeError("call reset(observation, info) before act()")
        self._observe(info)
        if self.sleeping:
            action, goal = "Noop", SubGoal("sleep", "sleep until my energy is full", "I am asleep in my shelter")
        else:
            action, goal = self._decide()
        self.goal = goal
        plan = interval = None
        if self._steps_to_plan <= 0:
            style = self.plan_styles[int(self._plan_rng.integers(len(self.plan_styles)))]
            plan = write_plan(style, self._plan_goals(goal), self.inv, self.status)
            interval = int(self._plan_rng.integers(self.plan_interval_min, self.plan_interval_max + 1))
            self._steps_to_plan = interval
            self.last_plan = plan
        self._steps_to_plan -= 1
        if action == "Place Plant":
            self._pending_plant = self.front
        self.t += 1
        return TeacherStep(action=action, plan=plan, plan_interval=interval)

    # ------------------------------------------------------------------ perception
    def _observe(self, info: dict[str, Any]) -> None:
        x, y = (int(v) for v in info["player_pos"])
        self.pos = (x, y)
        self.map.update(info["local_view"], self.pos, self.t)
        self.cell = self.map.cell(x, y)
        self.facing = (int(info["facing"][0]), int(info["facing"][1]))
        fx, fy = x + self.facing[0], y + self.facing[1]
        self.front = self.map.cell(fx, fy) if self.map.inside(fx, fy) else -1
        self.inv = dict(info["inventory"])
        self.status = dict(info["status"])
        self.sleeping = bool(info.get("sleeping", False))
        # The achievements the agent was rewarded for (+1 reward at each first unlock).
        self.achieved = set(info.get("achievements", {}))
        creatures = self.map.creatures
        if self._pending_plant is not None:
            if creatures.get(self._pending_plant) == "plant":
                self._plants[self._pending_plant] = 0
            self._pending_plant = None
        for cell in list(self._plants):
            px, py = self.map.xy(cell)
            if abs(px - x) + abs(py - y) < PLANT_UPDATE_DISTANCE:
                self._plants[cell] += 1
            if abs(px - x) <= 4 and abs(py - y) <= 3 and creatures.get(cell) != "plant":
                del self._plants[cell]
        self._last_positions = (self._last_positions + [self.cell])[-12:]

    # ------------------------------------------------------------------ helpers
    def _has(self, item: str, count: int = 1) -> bool:
        return self.inv.get(item, 0) >= count

    def _costs(self, *, tunnel: bool = True) -> list[int]:
        costs = [0] * (VOID + 1)
        for code in WALKABLE:
            costs[code] = 1
        costs[TREE] = 3
        if self._avoid_grass and self._zombie_time():
            # Zombies spawn on grass whenever the light is low; routes through the mountains
            # are worth a few extra steps then.
            costs[GRASS] += self.grass_penalty
            costs[WALKABLE_GUESS] += self.grass_penalty
        if tunnel:
            for code, tool in MINE_TOOL.items():
                if self._has(tool):
                    costs[code] = 3 if code == STONE else 2
        return costs

    def _offset(self, cell: int) -> str:
        cx, cy = self.map.xy(cell)
        return describe_offset(cx - self.pos[0], cy - self.pos[1])

    def _dir_to(self, cell: int) -> tuple[int, int]:
        cx, cy = self.map.xy(cell)
        return cx - self.pos[0], cy - self.pos[1]

    def _step_along(self, path: list[int]) -> str:
        if len(path) < 2:
            return "Noop"
        nxt = path[1]
        d = self._dir_to(nxt)
        move = DIRECTIONS[d]
        kind = self.map.creatures.get(nxt)
        if kind == "arrow":
            return "Noop"
        if kind is not None:
            return "Do" if self.facing == d else move
        if self.map.mat[nxt] in WALKABLE:
            return move
        # A tile to mine (stone, ore) or a tree to cut on the way.
        return "Do" if self.facing == d else move

    def _search(self, is_goal: Callable[[int], bool], *, tunnel: bool = True, max_cost: int = 400) -> list[int] | None:
        return self.map.search(
            self.cell, self._costs(tunnel=tunnel), is_goal, max_cost=max_cost, creature_cost=CREATURE_COST,
            danger=self._danger(),
        )

    def _danger(self) -> dict[int, int]:
        """Extra path cost near visible skeletons (their arrows) so paths keep out of their range."""
        if self._danger_step == self.t:
            return self._danger_cells
        danger: dict[int, int] = {}
        recent = self._last_positions[-6:]
        if len(recent) == 6 and len(set(recent)) == 2:
            # Dithering between two cells as skeletons move the cheapest detour back and forth:
            # ignore them for a moment and go straight.
            self._danger_step, self._danger_cells = self.t, danger
            return danger
        size = self.map_size
        radius = self.skeleton_avoid_radius
        for cell, kind in self.map.creatures.items():
            if kind != "skeleton" or not radius:
                continue
            x, y = divmod(cell, size)
            for cx in range(max(0, x - radius), min(size, x + radius + 1)):
                for cy in range(max(0, y - radius), min(size, y + radius + 1)):
                    if abs(cx - x) + abs(cy - y) <= radius:
                        danger[cx * size + cy] = danger.get(cx * size + cy, 0) + self.skeleton_avoid_cost
        self._danger_step, self._danger_cells = self.t, danger
        return danger

    def _adjacent_goal(self, targets: set[int]) -> Callable[[int], bool]:
        """Goal: a cell with a target among its 4 neighbours."""
        goal_cells = set()
        size = self.map_size
        for t in targets:
            x, y = divmod(t, size)
            if x > 0:
                goal_cells.add(t - size)
            if x < size - 1:
                goal_cells.add(t + size)
            if y > 0:
                goal_cells.add(t - 1)
            if y < size - 1:
                goal_cells.add(t + 1)
        return goal_cells.__contains__

    def _near_goal(self, targets: set[int]) -> Callable[[int], bool]:
        """Goal: a cell within one step, diagonals included, of a target (crafting 'nearby')."""
        goal_cells = set()
        size = self.map_size
        for t in targets:
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    goal_cells.add(t + dx * size + dy)
        return goal_cells.__contains__

    def _interact(self, targets: set[int], action: str = "Do", *, max_cost: int = 400, tunnel: bool = True) -> tuple[str, int] | None:
        """Walk next to one of `targets` (non-walkable tiles or creatures), face it, `action`."""
        if not targets:
            return None
        if self.front in targets:
            return action, self.front
        for nxt, dx, dy in self.map.neighbours(self.cell):
            if nxt in targets and self.map.mat[nxt] != LAVA:
                return DIRECTIONS[(dx, dy)], nxt
        path = self._search(self._adjacent_goal(targets), tunnel=tunnel, max_cost=max_cost)
        if path is None:
            return None
        end = path[-1]
        target = next((n for n, _, _ in self.map.neighbours(end) if n in targets), end)
        return self._step_along(path), target

    def _free(self, cell: int) -> bool:
        return self.map.mat[cell] in WALKABLE and cell not in self.map.creatures

    def _face_open(self, can_place: Callable[[int], bool], stand_ok: Callable[[int], bool] | None = None) -> str | None:
        """Get to face a tile where `can_place` holds (a walkable tile: one can only turn toward
        it by walking in its direction), standing on a cell where `stand_ok` holds. Returns
        'ready' when already facing one, else the action to get there, or None."""
        stand_ok = stand_ok or (lambda cell: True)
        if self.front >= 0 and can_place(self.front) and stand_ok(self.cell):
            return "ready"
        size = self.map_size
        choice: dict[int, tuple[int, int]] = {}

        def goal(cell: int) -> bool:
            x, y = divmod(cell, size)
            for (dx, dy) in DIRECTIONS:
                x1, y1, x2, y2 = x + dx, y + dy, x + 2 * dx, y + 2 * dy
                if not (0 <= x2 < size and 0 <= y2 < size):
                    continue
                mid, far = x1 * size + y1, x2 * size + y2
                if self._free(mid) and stand_ok(mid) and can_place(far):
                    choice[cell] = (dx, dy)
                    return True
            return False

        path = self._search(goal, max_cost=60)
        if path is None:
            return None
        if len(path) == 1:
            return DIRECTIONS[choice[self.cell]]
        return self._step_along(path)

    def _placeable(self, item: str) -> Callable[[int], bool]:
        where = PLACE_WHERE[item]
        return lambda cell: self.map.mat[cell] in where and cell not in self.map.creatures

    def _place(self, item: str, stand_ok: Callable[[int], bool] | None = None) -> str | None:
        action = f"Place {item.title()}"
        can = self._placeable(item)
        if item == "stone":
            if self.front >= 0 and can(self.front):
                return action
            for nxt, dx, dy in self.map.neighbours(self.cell):
                if self.map.mat[nxt] == WATER and nxt not in self.map.creatures:
                    return DIRECTIONS[(dx, dy)]  # turns toward the water without moving
        step = self._face_open(can, stand_ok)
        if step == "ready":
            return action
        return step

    def _known(self, *codes: int) -> set[int]:
        out: set[int] = set()
        for code in codes:
            out |= self.map.cells[code]
        return out

    def _creatures(self, kind: str) -> set[int]:
        return {cell for cell, name in self.map.creatures.items() if name == kind}

    # ------------------------------------------------------------------ exploration
    def _explore(self, purpose: str, *, mountains: bool = False) -> tuple[str, SubGoal]:
        m = self.map
        mat = m.mat
        costs = self._costs()
        size = self.map_size
        target = self._explore_target
        if (
            target is not None
            and self._explore_kind == purpose
            and target != self.cell
            and m.unknown_within(target) >= 3
        ):
            path = self._search(lambda c: c == target, max_cost=200)
            if path is not None:
                return self._step_along(path), self._explore_goal(purpose, target)

        def mountainous(cell: int) -> bool:
            x, y = divmod(cell, size)
            for cx in range(max(0, x - 2), min(size, x + 3)):
                for cy in range(max(0, y - 2), min(size, y + 3)):
                    if mat[cx * size + cy] in (STONE, COAL, IRON, DIAMOND, PATH, LAVA):
                        return True
            return False

        def frontier(cell: int) -> bool:
            return costs[mat[cell]] > 0 and m.has_unknown_neighbour(cell) and m.unknown_within(cell) >= 5

        path = None
        if mountains:
            path = self._search(lambda c: frontier(c) and mountainous(c), max_cost=120)
        if path is None:
            path = self._search(frontier, max_cost=400)
        if path is None or len(path) < 2:
            self._explore_target = None
            moves = [DIRECTIONS[(dx, dy)] for n, dx, dy in m.neighbours(self.cell) if self._free(n)]
            action = moves[int(self._move_rng.integers(len(moves)))] if moves else "Noop"
            return action, SubGoal("explore", f"wander to look for {purpose}", f"I have not seen any {purpose} yet")
        self._explore_target = path[-1]
        self._explore_kind = purpose
        return self._step_along(path), self._explore_goal(purpose, path[-1])

    def _explore_goal(self, purpose: str, target: int) -> SubGoal:
        return SubGoal(
            "explore",
            f"explore toward the unseen area {self._offset(target)} to find {purpose}",
            f"I have not seen any reachable {purpose} yet",
        )

    # ------------------------------------------------------------------ decision
    def _decide(self) -> tuple[str, SubGoal]:
        for decide in (self._fight, self._critical, self._sleep, self._drink, self._eat, self._progress):
            result = decide()
            if result is not None:
                return result
        self._avoid_grass = True
        try:
            return self._explore("new places")
        finally:
            self._avoid_grass = False

    def _fight(self) -> tuple[str, SubGoal] | None:
        creatures = self.map.creatures
        for nxt, dx, dy in self.map.neighbours(self.cell):
            kind = creatures.get(nxt)
            if kind in ("zombie", "skeleton"):
                action = "Do" if self.facing == (dx, dy) else DIRECTIONS[(dx, dy)]
                return action, SubGoal("fight", f"defeat the {kind} {self._offset(nxt)}", f"a {kind} next to me attacks me")
        health = self.status["health"]
        for kind, achievement in (("zombie", "defeat_zombie"), ("skeleton", "defeat_skeleton")):
            if achievement in self.achieved or health < 6 or self._chase_steps > 40:
                continue
            enemies = self._creatures(kind)
            if not enemies:
                continue
            found = self._interact(enemies, max_cost=8, tunnel=False)
            if found is not None:
                self._chase_steps += 1
                return found[0], SubGoal("fight", f"defeat the {kind} {self._offset(found[1])}", f"defeating a {kind} is an achievement and I am healthy")
        skeletons = self._creatures("skeleton")
        if skeletons and self.skeleton_flee_health and health <= self.skeleton_flee_health:
            danger = self._danger()
            if self.cell in danger:
                # Arrows hit for 2: when hurt, step out of every skeleton's range first.
                path = self.map.search(
                    self.cell, self._costs(), lambda c: c not in danger, max_cost=20, creature_cost=CREATURE_COST
                )
                if path is not None and len(path) > 1:
                    return self._step_along(path), SubGoal(
                        "flee", f"back away from the skeleton toward {self._offset(path[-1])}", f"my health is {health}/9 and skeletons shoot arrows"
                    )
        if skeletons and health >= self.skeleton_hunt_health and (self._has("stone_sword") or self._has("iron_sword")):
            found = self._interact(skeletons, max_cost=4, tunnel=False)
            if found is not None:
                return found[0], SubGoal("fight", f"defeat the skeleton {self._offset(found[1])}", "one sword hit kills it before it shoots me again")
        return None

    def _sealed(self) -> bool:
        """True when the walkable area around the player is at most 2 cells, closed by solid tiles."""
        m = self.map
        region = [self.cell]
        i = 0
        while i < len(region):
            for nxt, _, _ in m.neighbours(region[i]):
                code = m.mat[nxt]
                if code == UNKNOWN:
                    return False
                if code in WALKABLE or nxt in m.creatures:
                    if nxt in m.creatures and m.creatures[nxt] != "plant":
                        return False
                    if nxt not in region:
                        region.append(nxt)
                        if len(region) > 2:
                            return False
            i += 1
        return True

    def _critical(self) -> tuple[str, SubGoal] | None:
        """Food or drink about to run out comes before resting and sleeping."""
        if self.status["drink"] <= 2:
            return self._drink()
        if self.status["food"] <= 2:
            return self._eat()
        return None

    def _zombie_time(self) -> bool:
        # crafter keeps >= 1 zombie per grassy chunk while daylight < 0.83: from about 110 steps
        # into each 300-step day to its end (env._balance_chunk, env._update_time).
        return self.t % 300 >= self.zombie_time_start

    def _is_night(self) -> bool:
        # The agent counts its own steps; crafter's daylight has a 300-step period and is darkest
        # 210 steps into it (env._update_time), when zombies crowd the grass.
        return self.night_start <= self.t % 300 <= self.night_end

    def _enemies_within(self, distance: int) -> bool:
        x, y = self.pos
        for cell, kind in self.map.creatures.items():
            if kind in ("zombie", "skeleton", "arrow"):
                cx, cy = self.map.xy(cell)
                if abs(cx - x) + abs(cy - y) <= distance:
                    return True
        return False

    def _zombies_within(self, distance: int) -> bool:
        x, y = self.pos
        for cell, kind in self.map.creatures.items():
            if kind == "zombie":
                cx, cy = self.map.xy(cell)
                if abs(cx - x) + abs(cy - y) <= distance:
                    return True
        return False

    def _sleep(self) -> tuple[str, SubGoal] | None:
        energy, health = self.status["energy"], self.status["health"]
        if energy <= self.tired_energy or (energy <= self.night_sleep_energy and self._is_night()):
            self._sleep_mode = True
        if energy >= 9:
            self._sleep_mode = False
        if health <= self.rest_health or (health <= self.rest_health_enemies and self._enemies_within(6)):
            self._rest_mode = True
        if health >= 7:
            self._rest_mode = False
        if not (self._sleep_mode or self._rest_mode):
            self._shelter = None
            stay = (self.stay_while_zombies and self._zombies_within(8)) or (self.stay_at_night and self._is_night())
            if stay and self._sealed() and min(self.status["food"], self.status["drink"]) > 3:
                # Zombies wait outside the wall (they crowd the grass in the dark): leaving now
                # costs 2 health per zombie, staying costs only time.
                return "Noop", SubGoal("rest", "stay behind my stone wall until the zombies leave", "zombies are waiting outside")
            return None
        if self._sleep_mode:
            why = f"my energy is low ({energy}/9) and zombies hit sleepers hard"
        else:
            why = f"my health is low ({health}/9) and I recover safely behind stone"
        if self._sealed():
            if energy < 9:
                return "Sleep", SubGoal("sleep", "sleep here, walled in", why)
            return "Noop", SubGoal("rest", "rest here, walled in, until my health recovers", why)
        action = self._shelter_step()
        if action is not None:
            return action, SubGoal("shelter", "wall myself in with stone and sleep", why)
        if self._sleep_mode and energy == 0:
            return "Sleep", SubGoal("sleep", "sleep right here", "my energy is empty")
        return None

    def _shelter_step(self) -> str | None:
        """One step of walling in: the shelter is a 1-wide corridor of two cells whose sides are
        solid; its two ends get a stone each. One can only face an open tile by walking toward
        it, so each end is closed from the far cell's side: walk to the partner cell, arriving
        faced to that cell's end, place, walk back, place."""
        m = self.map
        size = self.map_size
        if self._shelter is None:
            self._shelter = self._find_shelter()
            if self._shelter is None:
                return None
        entry, (dx, dy) = self._shelter
        step = dx * size + dy
        first, second = entry + step, entry + 2 * step
        ends = {first: (entry, (-dx, -dy)), second: (entry + 3 * step, (dx, dy))}
        if self.cell in ends:
            partner = second if self.cell == first else first
            end, outward = ends[self.cell]
            if end in m.creatures:
                if m.creatures[end] in ("zombie", "skeleton", "cow") and self.facing == outward:
                    return "Do"
            elif m.mat[end] not in SOLID:
                if self.facing == outward:
                    return "Place Stone" if self._has("stone") else self._abandon_shelter()
            partner_end, _ = ends[partner]
            if m.mat[end] in SOLID and m.mat[partner_end] in SOLID and partner_end not in m.creatures:
                return self._abandon_shelter()  # closed but not sealed: the map disagrees, pick again
            return self._step_along([self.cell, partner])
        path = self._search(lambda c: c == first or c == second, max_cost=self.shelter_max_cost)
        if path is None:
            return self._abandon_shelter()
        return self._step_along(path)

    def _abandon_shelter(self) -> None:
        self._shelter = None
        return None

    def _find_shelter(self) -> tuple[int, tuple[int, int]] | None:
        m = self.map
        mat = m.mat
        size = self.map_size
        costs = self._costs()
        stone = self.inv.get("stone", 0)
        found: dict[int, tuple[int, int]] = {}

        def code(x: int, y: int) -> int:
            return mat[x * size + y] if 0 <= x < size and 0 <= y < size else VOID

        danger = self._danger()

        def goal(cell: int) -> bool:
            if mat[cell] not in WALKABLE or cell in danger:
                return False
            x, y = divmod(cell, size)
            for dx, dy in DIRECTIONS:
                need = 1
                gained = 0
                ok = True
                for k in (1, 2):
                    cx, cy = x + k * dx, y + k * dy
                    c = code(cx, cy)
                    if c in WALKABLE:
                        if cx * size + cy in m.creatures:
                            ok = False
                            break
                    elif costs[c] and c != TREE:
                        gained += c == STONE
                    else:
                        ok = False
                        break
                    for px, py in ((cx + dy, cy + dx), (cx - dy, cy - dx)):
                        if code(px, py) not in SOLID:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    continue
                end = code(x + 3 * dx, y + 3 * dy)
                if end not in SOLID:
                    if end not in WALKABLE:
                        continue
                    need += 1
                if stone + gained >= need:
                    found[cell] = (dx, dy)
                    return True
            return False

        path = m.search(
            self.cell, costs, goal, max_cost=self.shelter_max_cost, creature_cost=CREATURE_COST, danger=self._danger()
        )
        if path is None:
            return None
        return path[-1], found[path[-1]]

    def _drink(self) -> tuple[str, SubGoal] | None:
        drink = self.status["drink"]
        if drink >= 9:
            self._drinking = False
        water = self.map.cells[WATER]
        if not water:
            if drink <= 3:
                return self._explore("water")
            return None
        # Stock up while the light is safe, so the dark hours need no trip across the grass.
        stock_up = self.stock_up_level and not self._zombie_time() and drink <= self.stock_up_level
        urgent = drink <= self.drink_urgent or self._drinking or stock_up
        if urgent:
            max_cost = 400
        elif self._zombies_within(6):
            return None  # a top-up is not worth a zombie fight
        elif drink <= self.topup_level and not self._zombie_time():
            max_cost = 40
        elif drink <= 6:
            max_cost = 30
        elif "collect_drink" not in self.achieved:
            max_cost = 8
        elif self.front in water and drink < 9:
            return "Do", SubGoal("drink", "drink the water in front of me", f"my drink is {drink}/9")
        else:
            return None
        found = self._interact(water, max_cost=max_cost)
        if found is None:
            if drink <= self.drink_urgent or stock_up:
                return self._explore("water")
            return None
        if urgent:
            self._drinking = True
        why = f"my drink is {drink}/9" if drink < 8 else "drinking is an achievement and keeps me going"
        return found[0], SubGoal("drink", f"drink from the water {self._offset(found[1])}", why)

    def _eat(self) -> tuple[str, SubGoal] | None:
        food = self.status["food"]
        if food >= 8:
            self._eating = False
        ripe = {c for c, n in self._plants.items() if n >= PLANT_RIPE_UPDATES and self.map.creatures.get(c) == "plant"}
        if ripe and "eat_plant" not in self.achieved:
            found = self._interact(ripe, max_cost=60)
            if found is not None:
                return found[0], SubGoal("eat_plant", f"eat the ripe plant {self._offset(found[1])}", "the sapling I planted has grown")
        cows = self._creatures("cow") | set(self.map.cow_memory)
        stock_up = self.stock_up_level and not self._zombie_time() and food <= self.stock_up_level
        urgent = food <= self.food_urgent or self._eating or stock_up
        if urgent:
            max_cost = 400
        elif self._zombies_within(6):
            return None  # a snack is not worth a zombie fight
        elif food <= self.topup_level and not self._zombie_time():
            max_cost = 40
        elif food <= 7:
            max_cost = 25
        elif "eat_cow" not in self.achieved:
            max_cost = 8
        else:
            return None
        found = self._interact(cows, max_cost=max_cost) if cows else None
        if found is None:
            if food <= self.food_urgent or stock_up:
                return self._look_for_cows()
            return None
        if urgent:
            self._eating = True
        why = f"my food is {food}/9" if food < 8 else "eating a cow is an achievement and fills me up for later"
        return found[0], SubGoal("eat", f"hunt and eat the cow {self._offset(found[1])}", why)

    def _look_for_cows(self) -> tuple[str, SubGoal]:
        """Cows roam the grass: walk to grass not looked at for a while, else explore."""
        seen, mat, t = self.map.seen_step, self.map.mat, self.t
        path = self._search(lambda c: mat[c] == GRASS and t - seen[c] > 80, max_cost=200)
        if path is None or len(path) < 2:
            return self._explore("cows")
        return self._step_along(path), SubGoal(
            "eat", f"look for cows on the grass {self._offset(path[-1])}", f"my food is {self.status['food']}/9 and cows graze on grass"
        )

    # ------------------------------------------------------------------ the tech tree
    def _progress(self) -> tuple[str, SubGoal] | None:
        self._avoid_grass = True
        try:
            return self._progress_step()
        finally:
            self._avoid_grass = False

    def _progress_step(self) -> tuple[str, SubGoal] | None:
        inv = self.inv
        done = self.achieved
        wood = inv.get("wood", 0)
        stone = inv.get("stone", 0)

        # Free resources right in front of us (one Do each) are always worth taking.
        front_code = self.map.mat[self.front] if self.front >= 0 else VOID
        if self.front not in self.map.creatures:
            if front_code in MINE_TOOL and self._has(MINE_TOOL[front_code]) and (front_code != STONE or stone < 9):
                name = NAME[front_code]
                return "Do", SubGoal(f"collect_{name}", f"mine the {name} in front of me", f"{name} is useful for crafting")
            if front_code == TREE and wood < 9:
                return "Do", SubGoal("collect_wood", "collect wood from the tree in front of me", "wood is needed for tables and tools")

        tools_wood = sum(
            not self._has(tool)
            for tool in ("wood_pickaxe", "wood_sword", "stone_pickaxe", "stone_sword", "iron_pickaxe", "iron_sword")
        )
        # 1. Wood for the first table and the wood tools.
        if "place_table" not in done:
            if wood < PLACE_USES["table"]["wood"] + 3:
                return self._collect_wood(PLACE_USES["table"]["wood"] + 3, "I need a table (2 wood) and wood tools")
            return self._make_or_place("table", "a table lets me craft tools")
        if not self._has("wood_pickaxe"):
            return self._craft("wood_pickaxe", "a wood pickaxe lets me mine stone")
        if not self._has("wood_sword"):
            return self._craft("wood_sword", "a sword makes fights shorter")
        # 2. Top up wood for the later tools and a second table near the mines.
        wood_target = min(9, tools_wood + self.spare_wood)
        if wood < wood_target:
            trees = self.map.cells[TREE]
            if trees and self._search(self._adjacent_goal(trees), max_cost=self.wood_detour):
                return self._collect_wood(wood_target, "later tools and a table near the mines need wood")
        # 3. Sapling and plant while still on grass.
        if "place_plant" not in done:
            if self._has("sapling"):
                action = self._place("plant")
                if action:
                    return action, SubGoal("place_plant", "plant my sapling on the grass", "planting a sapling is an achievement and grows food")
            elif self._sapling_tries < 40:
                step = self._face_open(lambda c: self.map.mat[c] == GRASS and c not in self.map.creatures)
                if step is not None:
                    if step == "ready":
                        self._sapling_tries += 1
                        step = "Do"
                    return step, SubGoal("collect_sapling", "search the grass for a sapling", "a sapling can be planted for food")
        # 4. Stone, then the stone achievements.
        stone_target = (not self._has("stone_pickaxe")) + (not self._has("stone_sword"))
        stone_target += PLACE_USES["furnace"]["stone"] if "place_furnace" not in done else 0
        stone_target = min(9, stone_target + 2)
        if stone < (stone_target if "place_furnace" not in done else 3):
            result = self._collect({STONE}, "stone", f"I need stone for tools, a furnace and shelters (have {stone})")
            if result is not None:
                return result
        if "place_stone" not in done and stone >= 1:
            action = self._place("stone")
            if action:
                return action, SubGoal("place_stone", "place a stone in front of me", "placing stone is an achievement and walls off danger")
        for tool in ("stone_pickaxe", "stone_sword"):
            if not self._has(tool) and stone >= 1:
                if wood < 1:
                    return self._collect_wood(2, f"a {tool.replace('_', ' ')} needs wood")
                return self._craft(tool, "stone tools mine iron and hit harder")
        if "place_furnace" not in done and stone >= PLACE_USES["furnace"]["stone"]:
            result = self._furnace_near_table()
            if result is not None:
                return result
        # 5. Coal and iron, then iron tools.
        iron_tools = [t for t in ("iron_pickaxe", "iron_sword") if not self._has(t)]
        if iron_tools:
            coal, iron = inv.get("coal", 0), inv.get("iron", 0)
            if coal < 1:
                return self._collect({COAL}, "coal", "iron tools need coal")
            if self._has("stone_pickaxe") and iron < 1:
                return self._collect({IRON}, "iron", "iron tools need iron")
            if iron >= 1 and coal >= 1:
                if wood < 1:
                    return self._collect_wood(3, "iron tools need wood")
                return self._craft(iron_tools[0], "iron tools are the last step before diamonds")
        # 6. Diamonds.
        if self._has("iron_pickaxe"):
            return self._collect({DIAMOND}, "diamonds", "a diamond is the rarest achievement")
        if self.inv.get("coal", 0) < 2:
            return self._collect({COAL}, "coal", "coal fuels iron tools")
        return self._collect({IRON, DIAMOND} if self._has("stone_pickaxe") else {COAL}, "iron", "iron and diamonds are still missing")

    def _collect_wood(self, target: int, why: str) -> tuple[str, SubGoal]:
        wood = self.inv.get("wood", 0)
        found = self._interact(self.map.cells[TREE])
        if found is None:
            return self._explore("trees")
        return found[0], SubGoal(
            "collect_wood", f"collect {target - wood} more wood from the tree {self._offset(found[1])}", why
        )

    def _collect(self, codes: set[int], purpose: str, why: str) -> tuple[str, SubGoal] | None:
        tool_ok = all(code not in MINE_TOOL or self._has(MINE_TOOL[code]) for code in codes)
        if not tool_ok:
            return None
        found = self._interact(self._known(*codes))
        if found is None:
            return self._explore(purpose, mountains=True)
        name = NAME[self.map.mat[found[1]]]
        return found[0], SubGoal(f"collect_{name}", f"mine the {name} {self._offset(found[1])}", why)

    def _near(self, code: int) -> bool:
        x, y = self.pos
        return any(self.map.code_at(x + dx, y + dy) == code for dx in (-1, 0, 1) for dy in (-1, 0, 1))

    def _craft(self, tool: str, why: str) -> tuple[str, SubGoal]:
        action = "Make " + tool.replace("_", " ").title()
        needs_furnace = "furnace" in crafter.constants.make[tool]["nearby"]
        name = tool.replace("_", " ")
        text = f"craft {'an' if name[0] in 'aeiou' else 'a'} {name}"
        if self._near(TABLE) and (not needs_furnace or self._near(FURNACE)):
            return action, SubGoal(f"make_{tool}", text + " at the table next to me", why)
        tables = self.map.cells[TABLE]
        if needs_furnace:
            furnaces = self.map.cells[FURNACE]
            near_t, near_f = self._near_goal(tables), self._near_goal(furnaces)
            path = self._search(lambda c: near_t(c) and near_f(c), max_cost=40) if tables and furnaces else None
            if path is not None:
                return self._step_along(path), SubGoal(f"make_{tool}", text + f" at the table and furnace {self._offset(path[-1])}", why)
            if self._near(TABLE):
                result = self._furnace_near_table()
                if result is not None:
                    return result[0], SubGoal(f"make_{tool}", f"place a furnace by the table, then {text}", why)
        else:
            path = self._search(self._near_goal(tables), max_cost=30) if tables else None
            if path is not None:
                return self._step_along(path), SubGoal(f"make_{tool}", text + f" at the table {self._offset(path[-1])}", why)
        wood_needed = PLACE_USES["table"]["wood"] + MAKE_USES[tool].get("wood", 0)
        if self.inv.get("wood", 0) < wood_needed:
            return self._collect_wood(wood_needed, f"a new table and a {tool.replace('_', ' ')} need {wood_needed} wood")
        return self._make_or_place("table", f"I need a table nearby to {text}")

    def _make_or_place(self, item: str, why: str) -> tuple[str, SubGoal]:
        action = self._place(item)
        if action is None:
            return self._explore("open ground")
        return action, SubGoal(f"place_{item}", f"place a {item} here", why)

    def _furnace_near_table(self) -> tuple[str, SubGoal] | None:
        tables = self.map.cells[TABLE]
        near_table = self._near_goal(tables)
        action = self._place("furnace", stand_ok=near_table)
        if action is None:
            return None
        return action, SubGoal("place_furnace", "place a furnace next to the table", "iron tools need a table and a furnace side by side")

    # ------------------------------------------------------------------ plans
    def _plan_goals(self, goal: SubGoal) -> list[SubGoal]:
        goals = [goal]
        for key, text, why in MILESTONES:
            if len(goals) >= 3:
                break
            if key in self.achieved or key == goal.key or any(g.key == key for g in goals):
                continue
            if key.startswith("make_") and self._has(key[len("make_"):]):
                continue
            goals.append(SubGoal(key, text, why))
        return goals


MILESTONES: tuple[tuple[str, str, str], ...] = (
    ("collect_wood", "collect wood from trees", "wood is the base of every tool"),
    ("place_table", "place a table", "tools are crafted at a table"),
    ("make_wood_pickaxe", "craft a wood pickaxe", "it mines stone"),
    ("make_wood_sword", "craft a wood sword", "it helps against zombies"),
    ("collect_sapling", "collect a sapling from the grass", "saplings grow into food"),
    ("place_plant", "plant a sapling", "a plant gives food later"),
    ("collect_stone", "mine stone", "stone makes better tools"),
    ("place_stone", "place a stone", "stone walls keep enemies away"),
    ("make_stone_pickaxe", "craft a stone pickaxe", "it mines iron"),
    ("make_stone_sword", "craft a stone sword", "it hits harder"),
    ("place_furnace", "place a furnace by a table", "iron tools need a furnace"),
    ("collect_coal", "mine coal", "iron tools need coal"),
    ("collect_iron", "mine iron", "iron tools need iron"),
    ("make_iron_pickaxe", "craft an iron pickaxe", "only it can mine diamonds"),
    ("make_iron_sword", "craft an iron sword", "it is the strongest weapon"),
    ("collect_diamond", "mine a diamond", "diamonds are the rarest find"),
)
