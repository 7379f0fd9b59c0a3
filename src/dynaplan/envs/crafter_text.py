"""Crafter as a gymnasium text env with BALROG-compatible observations (the "precise" variant).

Wraps `crafter.Env` (it does not fork it): one small subclass fixes crafter's set-ordering
nondeterminism and skips pixel rendering nobody asked for. The text is a pure function of the
info dict (`render_observation(info)`), so it can be tested and re-rendered on recorded infos.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import crafter
import gymnasium
import numpy as np
from gymnasium import spaces

# The 17 actions in crafter's index order (BALROG's names; DESIGN.md section 4).
ACTION_NAMES: tuple[str, ...] = (
    "Noop",
    "Move West",
    "Move East",
    "Move North",
    "Move South",
    "Do",
    "Sleep",
    "Place Stone",
    "Place Table",
    "Place Furnace",
    "Place Plant",
    "Make Wood Pickaxe",
    "Make Stone Pickaxe",
    "Make Iron Pickaxe",
    "Make Wood Sword",
    "Make Stone Sword",
    "Make Iron Sword",
)
ACTION_DESCRIPTIONS: dict[str, str] = {
    "Noop": "do nothing",
    "Move West": "move west on flat ground",
    "Move East": "move east on flat ground",
    "Move North": "move north on flat ground",
    "Move South": "move south on flat ground",
    "Do": "multiuse action to collect material, drink from lake and hit creature in front",
    "Sleep": "sleep when energy level is below maximum",
    "Place Stone": "place a stone in front",
    "Place Table": "place a table",
    "Place Furnace": "place a furnace",
    "Place Plant": "place a plant",
    "Make Wood Pickaxe": "craft a wood pickaxe with a nearby table and wood in inventory",
    "Make Stone Pickaxe": "craft a stone pickaxe with a nearby table, wood, and stone in inventory",
    "Make Iron Pickaxe": "craft an iron pickaxe with a nearby table and furnace, wood, coal, and iron in inventory",
    "Make Wood Sword": "craft a wood sword with a nearby table and wood in inventory",
    "Make Stone Sword": "craft a stone sword with a nearby table, wood, and stone in inventory",
    "Make Iron Sword": "craft an iron sword with a nearby table and furnace, wood, coal, and iron in inventory",
}
# The 22 achievements as crafter spells them, in BALROG's instruction order.
ACHIEVEMENTS: tuple[str, ...] = (
    "collect_wood",
    "place_table",
    "eat_cow",
    "collect_sapling",
    "collect_drink",
    "make_wood_pickaxe",
    "make_wood_sword",
    "place_plant",
    "defeat_zombie",
    "collect_stone",
    "place_stone",
    "eat_plant",
    "defeat_skeleton",
    "make_stone_pickaxe",
    "make_stone_sword",
    "wake_up",
    "place_furnace",
    "collect_coal",
    "collect_iron",
    "make_iron_pickaxe",
    "make_iron_sword",
    "collect_diamond",
)
VITALS: tuple[str, ...] = ("health", "food", "drink", "energy")
ITEMS: tuple[str, ...] = tuple(name for name in crafter.constants.items if name not in VITALS)
# Tiles never listed in "You see" (they are everywhere) and reported as "nothing" when faced.
SKIP_TILES: frozenset[str] = frozenset({"grass", "sand", "path"})
# Cells of the local view that lie outside the world (the player stands at the map border).
VOID = "void"
VIEW_ROWS, VIEW_COLS = 7, 9  # north->south x west->east; the player is at row 3, col 4
PLAYER_ROW, PLAYER_COL = VIEW_ROWS // 2, VIEW_COLS // 2
SLEEPING_LINE = "You are sleeping, and will not be able take actions until energy is full."
DEAD_LINE = "You died."
MAX_OBSERVATION_CHARS = 4096  # 62 listed tiles x ~42 chars + status and inventory < 3,200

assert set(ACHIEVEMENTS) == set(crafter.constants.achievements)
assert len(ACTION_NAMES) == len(crafter.constants.actions) == 17


def _steps(count: int, direction: str) -> str:
    return f"{count} step{'s' if count > 1 else ''} {direction}"


def describe_offset(dx: int, dy: int) -> str:
    """BALROG's precise location: '3 steps north and 4 steps west' (north/south first)."""
    parts = []
    if dy < 0:
        parts.append(_steps(-dy, "north"))
    elif dy > 0:
        parts.append(_steps(dy, "south"))
    if dx < 0:
        parts.append(_steps(-dx, "west"))
    elif dx > 0:
        parts.append(_steps(dx, "east"))
    return " and ".join(parts) if parts else "at your location"


def render_history_text(info: Mapping[str, Any], edge_only: Sequence[str] = ("water", "lava")) -> str:
    """The long-term part of the observation: sleeping/dead line, 'You see:' list, faced tile.

    Pure function of `info["local_view"]`, `info["facing"]`, `info["sleeping"]` and
    `info["status"]["health"]`. Tiles are listed column by column, west to east and north to
    south within a column, as BALROG does; tiles in `edge_only` only where a 4-neighbour inside
    the view differs (the shore of a lake, not its whole surface).
    """
    view = info["local_view"]
    edge_only = frozenset(edge_only)
    lines: list[str] = []
    # Death first: a player killed in its sleep is still flagged as sleeping by crafter.
    if info["status"]["health"] <= 0:
        lines += [DEAD_LINE, ""]
    elif info["sleeping"]:
        lines += [SLEEPING_LINE, ""]
    seen = []
    for col in range(VIEW_COLS):
        for row in range(VIEW_ROWS):
            name = view[row][col]
            if name in SKIP_TILES or name == VOID or name == "player":
                continue
            if name in edge_only and not _is_edge(view, row, col, name):
                continue
            seen.append(f"- {name} {describe_offset(col - PLAYER_COL, row - PLAYER_ROW)}")
    lines += ["You see:", *seen] if seen else ["You see nothing away from you."]
    dx, dy = info["facing"]
    front = view[PLAYER_ROW + dy][PLAYER_COL + dx]
    if front in SKIP_TILES or front == VOID:
        front = "nothing"
    lines += ["", f"You face {front} at your front."]
    return "\n".join(lines)


def _is_edge(view: Sequence[Sequence[str]], row: int, col: int, name: str) -> bool:
    for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
        if 0 <= r < VIEW_ROWS and 0 <= c < VIEW_COLS and view[r][c] != name:
            return True
    return False


def render_status_text(info: Mapping[str, Any]) -> str:
    """The short-term part: status out of 9 and the non-zero inventory items."""
    lines = ["Your status:"] + [f"- {name}: {info['status'][name]}/9" for name in VITALS]
    items = [f"- {name}: {count}" for name, count in info["inventory"].items() if count]
    lines += ["", "Your inventory:", *items] if items else ["", "You have nothing in your inventory."]
    return "\n".join(lines)


def render_observation(info: Mapping[str, Any], edge_only: Sequence[str] = ("water", "lava")) -> str:
    """The whole text observation: what is seen and faced, then status and inventory."""
    return f"{render_history_text(info, edge_only)}\n\n{render_status_text(info)}"


def crafter_rules() -> str:
    """The BALROG instruction without its output-format part (the prompt builder adds that)."""
    actions = "\n".join(f"{name}: {ACTION_DESCRIPTIONS[name]}" for name in ACTION_NAMES)
    achievements = ", ".join(name.replace("_", " ").title() for name in ACHIEVEMENTS)
    return (
        "You are an agent playing Crafter, a 2D survival game. The following are the only valid "
        f"actions:\n{actions}\n\n"
        f"These are the game achievements you can get: {achievements}.\n\n"
        "Each observation lists what you see in a 9x7 window around you with its offset, what "
        "you face, your status (health, food, drink, energy, each out of 9) and your inventory. "
        "Your goal is to get as far as possible by completing all the achievements, and to stay "
        "alive: drink water, eat, and sleep when energy is low."
    )


def action_index(action: Any) -> int:
    """An action index from an index (int or numpy integer) or one of ACTION_NAMES."""
    if isinstance(action, (int, np.integer)) and not isinstance(action, (bool, np.bool_)):
        if 0 <= int(action) < len(ACTION_NAMES):
            return int(action)
    elif isinstance(action, str) and action in _ACTION_INDEX:
        return _ACTION_INDEX[action]
    raise ValueError(
        f"unknown Crafter action {action!r}; expected an index 0..{len(ACTION_NAMES) - 1} or one of: "
        + ", ".join(ACTION_NAMES)
    )


_ACTION_INDEX = {name: i for i, name in enumerate(ACTION_NAMES)}


class _DeterministicCrafter(crafter.Env):
    """crafter.Env with two overrides; everything else is crafter's own code."""

    def __init__(self, *, render_pixels: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.render_pixels = render_pixels
        # The shape of the night noise LocalView._noise draws: grid cells x pixels per cell.
        self._noise_shape = tuple(int(n) for n in self._local_view._grid * (self._size // self._view))

    def _balance_chunk(self, chunk, objs):
        # Determinism fix: crafter keeps each chunk's objects in a `set`, whose iteration order
        # follows memory addresses, and `_balance_object` picks the creature to despawn by an
        # index into a list built from that set, so two runs with the same seed and actions
        # diverge (from step 10 on). Objects occupy one cell each, so sorting by position gives
        # the same list, and the same despawn, in every run and every process.
        ordered = sorted(objs, key=lambda obj: (int(obj.pos[0]), int(obj.pos[1])))
        super()._balance_chunk(chunk, ordered)

    def _obs(self):
        if self.render_pixels:
            return self.render()
        # Speed: crafter renders an RGB frame every step, and the text env never reads it. But
        # at night the renderer draws noise from the *world* RNG, so skipping it would change
        # every later creature move; draw the same numbers and drop them, which keeps
        # trajectories identical to rendering ones (and to crafter's) at a fraction of the cost.
        if self._world.daylight < 0.5:
            self._world.random.uniform(32, 127, self._noise_shape)
        return None


class CrafterTextEnv(gymnasium.Env):
    """Crafter with text observations; see the module docstring and `dynaplan.envs`."""

    metadata = {"render_modes": ["rgb_array"]}
    action_names: tuple[str, ...] = ACTION_NAMES
    default_action: str = "Noop"

    def __init__(
        self,
        max_steps: int = 2000,
        area: int = 64,
        edge_only: Sequence[str] = ("water", "lava"),
        render_pixels: bool = False,
        render_mode: str | None = None,
    ) -> None:
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if not isinstance(area, int) or area < 9:
            raise ValueError(f"area must be an int >= 9 (the view is 9x9), got {area!r}")
        unknown = set(edge_only) - set(crafter.constants.materials)
        if unknown:
            raise ValueError(f"edge_only has unknown materials {sorted(unknown)}; expected any of {crafter.constants.materials}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.max_steps = max_steps
        self.edge_only = tuple(edge_only)
        self.render_mode = render_mode
        # crafter's own episode length is switched off (None): the wrapper truncates at max_steps.
        self._env = _DeterministicCrafter(
            render_pixels=render_pixels, area=(area, area), length=None, seed=0
        )
        self.observation_space = spaces.Text(
            max_length=MAX_OBSERVATION_CHARS, charset=string.printable
        )
        self.action_space = spaces.Discrete(len(ACTION_NAMES))
        names = [VOID] * 32
        for material, index in self._env._world._mat_ids.items():
            names[index] = VOID if material is None else material
        for cls, index in self._env._sem_view._obj_ids.items():
            names[index] = cls.__name__.lower()
        self._tile_names = names
        self._step = 0
        self._done = True
        self._first_unlock: dict[str, int] = {}
        self._seeded = False

    @property
    def rules(self) -> str:
        return crafter_rules()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None and (
            not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or seed < 0
        ):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r} ({type(seed).__name__})")
        super().reset(seed=None if seed is None else int(seed))
        if seed is not None:
            # crafter seeds episode n of Env(seed=s) with hash((s, n)); restarting the episode
            # count makes reset(seed=s) give the same world as crafter.Env(seed=s).reset().
            self._env._seed, self._env._episode = int(seed), 0
        elif not self._seeded:
            # Unseeded first reset: a seed from gymnasium's entropy-seeded np_random.
            self._env._seed = int(self.np_random.integers(0, 2**31 - 1))
        self._seeded = True
        self._env.reset()
        self._step = 0
        self._done = False
        self._first_unlock = {}
        info = self._info(self._env._sem_view())
        return self._observation(info), info

    def step(self, action):
        index = action_index(action)
        if self._done:
            raise RuntimeError("the episode is over; call reset() before step()")
        _, reward, _, raw_info = self._env.step(index)
        self._step += 1
        player = self._env._player
        for name, count in player.achievements.items():
            if count > 0 and name not in self._first_unlock:
                self._first_unlock[name] = self._step
        info = self._info(raw_info["semantic"])
        terminated = player.health <= 0
        truncated = not terminated and self._step >= self.max_steps
        self._done = terminated or truncated
        return self._observation(info), float(reward), terminated, truncated, info

    @staticmethod
    def _observation(info: dict[str, Any]) -> str:
        # Same text as render_observation(info), reusing the history part already in info.
        return f"{info['history_text']}\n\n{render_status_text(info)}"

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        # Rendering on demand must not disturb the world RNG (night noise), so restore it.
        state = self._env._world.random.get_state()
        frame = self._env.render()
        self._env._world.random.set_state(state)
        return frame

    def _info(self, semantic: np.ndarray) -> dict[str, Any]:
        player = self._env._player
        x, y = int(player.pos[0]), int(player.pos[1])
        width, height = semantic.shape
        x0, y0 = x - PLAYER_COL, y - PLAYER_ROW
        window = semantic[max(x0, 0): x0 + VIEW_COLS, max(y0, 0): y0 + VIEW_ROWS].tolist()
        names = self._tile_names
        local_view = []
        for row in range(VIEW_ROWS):
            cells = []
            for col in range(VIEW_COLS):
                wx, wy = x0 + col, y0 + row
                if 0 <= wx < width and 0 <= wy < height:
                    cells.append(names[window[wx - max(x0, 0)][wy - max(y0, 0)]])
                else:
                    cells.append(VOID)
            local_view.append(cells)
        inventory = player.inventory
        achievements = dict(sorted(self._first_unlock.items(), key=lambda kv: (kv[1], kv[0])))
        info = {
            "local_view": local_view,
            "player_pos": (x, y),
            "facing": (int(player.facing[0]), int(player.facing[1])),
            "inventory": {name: int(inventory[name]) for name in ITEMS},
            "status": {name: int(inventory[name]) for name in VITALS},
            "sleeping": bool(player.sleeping),
            "step": self._step,
            "achievements": achievements,
            "progression": len(achievements) / len(ACHIEVEMENTS),
            "crafter_achievements": {name: int(count) for name, count in player.achievements.items()},
        }
        info["history_text"] = render_history_text(info, self.edge_only)
        return info
