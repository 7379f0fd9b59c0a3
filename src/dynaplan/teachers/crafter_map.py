"""The Crafter expert's remembered map: every tile it has seen in its 9x7 views, and searches on it.

Built only from `info["local_view"]` and `info["player_pos"]` (what the agent itself saw); it must
never read the env's world. Tiles never seen stay unknown and are never walked on.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable, Iterable, Sequence

MATERIALS: tuple[str, ...] = (
    "water", "grass", "stone", "path", "sand", "tree", "lava",
    "coal", "iron", "diamond", "table", "furnace",
)
UNKNOWN = 0
CODE: dict[str, int] = {name: i + 1 for i, name in enumerate(MATERIALS)}
# A tile seen only under a creature: walkable for sure (cows, zombies and skeletons only stand on
# grass, sand or path), material unknown.
WALKABLE_GUESS = len(MATERIALS) + 1
VOID = len(MATERIALS) + 2  # outside the world
NAME: dict[int, str] = {code: name for name, code in CODE.items()}
NAME.update({UNKNOWN: "unknown", WALKABLE_GUESS: "ground", VOID: "void"})

WALKABLE: frozenset[int] = frozenset({CODE["grass"], CODE["sand"], CODE["path"], WALKABLE_GUESS})
# What stops a zombie and an arrow next to a sleeping player (arrows fly over water and lava,
# but skeletons stay in dark tunnels; a sleeping spot with water beside it is accepted).
SOLID: frozenset[int] = frozenset(
    CODE[name] for name in ("stone", "tree", "coal", "iron", "diamond", "table", "furnace", "water", "lava")
) | {VOID}
CREATURES: frozenset[str] = frozenset({"cow", "zombie", "skeleton", "arrow", "plant", "player"})
DIRECTIONS: dict[tuple[int, int], str] = {
    (-1, 0): "Move West", (1, 0): "Move East", (0, -1): "Move North", (0, 1): "Move South",
}


class CrafterMap:
    """Material memory on a `size` x `size` grid (cell index = x * size + y) plus the creatures
    seen in the latest view. Materials change only by the player's own acts (and arrows that
    break tables), so a remembered tile stays true until the player sees it again."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.mat = bytearray(size * size)
        self.seen_count = 0
        self.seen_step = array("i", [-(10**6)]) * (size * size)  # when each cell was last in view
        self.creatures: dict[int, str] = {}  # cell -> name, from the latest view only
        self.cow_memory: dict[int, int] = {}  # cell -> step a cow was last seen there
        # Cells of each material code, kept in step with `mat` so target look-ups cost nothing.
        self.cells: dict[int, set[int]] = {code: set() for code in range(VOID + 1)}
        self.cells[UNKNOWN] = set()  # not tracked (most of the map)

    def cell(self, x: int, y: int) -> int:
        return x * self.size + y

    def xy(self, cell: int) -> tuple[int, int]:
        return divmod(cell, self.size)

    def inside(self, x: int, y: int) -> bool:
        return 0 <= x < self.size and 0 <= y < self.size

    def name_at(self, cell: int) -> str:
        return NAME[self.mat[cell]]

    def set_code(self, cell: int, code: int) -> None:
        old = self.mat[cell]
        if old == code:
            return
        if old != UNKNOWN:
            self.cells[old].discard(cell)
        if code != UNKNOWN:
            self.cells[code].add(cell)
        self.mat[cell] = code

    def update(self, local_view: Sequence[Sequence[str]], player_pos: Sequence[int], step: int) -> None:
        """Write one 9x7 view (rows north->south, columns west->east, player at row 3, col 4)."""
        px, py = int(player_pos[0]), int(player_pos[1])
        size, mat, set_code, seen_step = self.size, self.mat, self.set_code, self.seen_step
        self.creatures = {}
        for row, names in enumerate(local_view):
            y = py + row - 3
            for col, name in enumerate(names):
                x = px + col - 4
                if not (0 <= x < size and 0 <= y < size):
                    continue
                cell = x * size + y
                seen_step[cell] = step
                code = CODE.get(name)
                if code is not None:
                    if mat[cell] != code:
                        set_code(cell, code)
                    continue
                if name in CREATURES or name.startswith("plant"):
                    kind = "plant" if name.startswith("plant") else name
                    if kind == "player":
                        if mat[cell] not in WALKABLE:
                            set_code(cell, WALKABLE_GUESS)
                        continue
                    self.creatures[cell] = kind
                    if kind in ("cow", "zombie", "skeleton") and mat[cell] not in WALKABLE:
                        set_code(cell, WALKABLE_GUESS)
                    elif kind == "plant":
                        set_code(cell, CODE["grass"])
                    if kind == "cow":
                        self.cow_memory[cell] = step
                else:
                    set_code(cell, VOID)
        # Forget cows remembered inside the current view that are no longer there.
        for cell in list(self.cow_memory):
            x, y = divmod(cell, size)
            if abs(x - px) <= 4 and abs(y - py) <= 3 and self.creatures.get(cell) != "cow":
                del self.cow_memory[cell]
            elif step - self.cow_memory[cell] > 60:
                del self.cow_memory[cell]

    def neighbours(self, cell: int) -> Iterable[tuple[int, int, int]]:
        """(neighbour cell, dx, dy) for the 4 orthogonal neighbours inside the grid."""
        size = self.size
        x, y = divmod(cell, size)
        if x > 0:
            yield cell - size, -1, 0
        if x < size - 1:
            yield cell + size, 1, 0
        if y > 0:
            yield cell - 1, 0, -1
        if y < size - 1:
            yield cell + 1, 0, 1

    def code_at(self, x: int, y: int) -> int:
        return self.mat[x * self.size + y] if self.inside(x, y) else VOID

    def search(
        self,
        start: int,
        costs: Sequence[int],
        is_goal: Callable[[int], bool],
        *,
        max_cost: int = 400,
        creature_cost: dict[str, int] | None = None,
        danger: dict[int, int] | None = None,
    ) -> list[int] | None:
        """Cheapest path (cells from start to a goal) under per-material `costs` (0 = blocked).

        Dijkstra with early exit: targets are usually near, so few cells are expanded. The start
        cell itself may be a goal. Creatures in the latest view add their cost (0 = blocked)."""
        creature_cost = creature_cost or {}
        danger = danger or {}
        mat, size, creatures = self.mat, self.size, self.creatures
        dist = {start: 0}
        parent = {start: -1}
        heap = [(0, start)]
        last = size * size
        while heap:
            d, cell = heapq.heappop(heap)
            if d > dist[cell]:
                continue
            if is_goal(cell):
                path = []
                while cell != -1:
                    path.append(cell)
                    cell = parent[cell]
                return path[::-1]
            if d >= max_cost:
                continue
            x = cell // size
            y = cell - x * size
            for nxt in (
                cell - size if x > 0 else -1,
                cell + size if cell + size < last else -1,
                cell - 1 if y > 0 else -1,
                cell + 1 if y < size - 1 else -1,
            ):
                if nxt < 0:
                    continue
                step_cost = costs[mat[nxt]]
                if not step_cost:
                    continue
                kind = creatures.get(nxt)
                if kind is not None:
                    extra = creature_cost.get(kind, 0)
                    if not extra:
                        continue
                    step_cost += extra
                nd = d + step_cost + danger.get(nxt, 0)
                if nd < dist.get(nxt, 1 << 30):
                    dist[nxt] = nd
                    parent[nxt] = cell
                    heapq.heappush(heap, (nd, nxt))
        return None

    def has_unknown_neighbour(self, cell: int) -> bool:
        mat = self.mat
        for nxt, _, _ in self.neighbours(cell):
            if mat[nxt] == UNKNOWN:
                return True
        return False

    def unknown_within(self, cell: int, radius_x: int = 4, radius_y: int = 3) -> int:
        """How many unknown cells a view from `cell` would reveal (the gain of going there)."""
        size, mat = self.size, self.mat
        x, y = divmod(cell, size)
        count = 0
        for cx in range(max(0, x - radius_x), min(size, x + radius_x + 1)):
            base = cx * size
            for cy in range(max(0, y - radius_y), min(size, y + radius_y + 1)):
                if mat[base + cy] == UNKNOWN:
                    count += 1
        return count
