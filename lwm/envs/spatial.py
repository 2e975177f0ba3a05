"""Where things are relative to where the agent started, from its own observations.

BabyAI says locations relative to the agent's pose when the episode starts ("the ball on your
left", "the key behind you"): the half-planes of the start pose, as minigrid's `ObjDesc` tests
them. The agent never sees its position, only its view, its absolute direction and what it
carries. `StartFrame` keeps its pose by dead reckoning (a `forward` moves it exactly when the
cell in front could be entered) and notes what it sees in every cell the first time it sees the
cell, in coordinates relative to the start. That is enough to say which seen objects lie in which
start-relative location, and so to turn a goal with a location into one the world model knows
well: "pick up the ball on your right" -> "pick up the blue ball" once the only balls seen on the
right are blue.

    frame = StartFrame(obs)                 # at reset
    frame.resolve(ObjRef("ball", None, "right"))   # ObjRef('ball', 'blue') or None (not yet seen)
    frame.resolve_goal(goal)                # the goal with every settled location made concrete
    frame.step(action, obs_before, obs_after)      # after every env step

Cells are noted once, when first seen, so an object the agent carries away and drops stays where
the episode started it, as BabyAI judges locations.
"""

from __future__ import annotations

import numpy as np
from minigrid.core.constants import DIR_TO_VEC, IDX_TO_COLOR, IDX_TO_OBJECT

from lwm.goals import OBJECT_TYPES, Goal, ObjRef

__all__ = ["StartFrame", "start_locations", "view_positions"]

VIEW = 7
"""The egocentric view's size: the agent stands at column 3 of the bottom row, facing up."""
_FORWARD = 2  # minigrid's action index
_ENTERABLE = {"empty", "floor", "goal", "lava"}
_UNSEEN = "unseen"


def view_positions(pos: tuple[int, int], direction: int) -> np.ndarray:
    """Grid positions (7, 7, 2) of the view's cells [x, y] for an agent at `pos` facing
    `direction`: cell (x, y) lies 6 - y ahead of the agent and x - 3 to its right."""
    forward = np.asarray(DIR_TO_VEC[direction])
    right = np.array([-forward[1], forward[0]])
    x, y = np.meshgrid(np.arange(VIEW), np.arange(VIEW), indexing="ij")
    ahead, aside = VIEW - 1 - y, x - VIEW // 2
    return np.asarray(pos) + ahead[..., None] * forward + aside[..., None] * right


def enterable(cell: np.ndarray) -> bool:
    """Whether minigrid lets the agent step into a view cell (type, colour, state): an empty
    cell, floor, goal, lava or an open door (state 0)."""
    kind = IDX_TO_OBJECT[int(cell[0])]
    return kind in _ENTERABLE or (kind == "door" and int(cell[2]) == 0)


def start_locations(offset: tuple[int, int], start_dir: int) -> set[str]:
    """The start-relative locations of a cell `offset` (x, y) cells from the start position, for
    an agent that started facing `start_dir`: BabyAI's half-planes (a cell can be both "left"
    and "front", and is in none along the axis it lies on)."""
    d1 = DIR_TO_VEC[start_dir]
    d2 = (-d1[1], d1[0])  # the start pose's right
    ahead = offset[0] * d1[0] + offset[1] * d1[1]
    right = offset[0] * d2[0] + offset[1] * d2[1]
    found = set()
    if right < 0:
        found.add("left")
    if right > 0:
        found.add("right")
    if ahead > 0:
        found.add("front")
    if ahead < 0:
        found.add("behind")
    return found


class StartFrame:
    """The agent's pose relative to its start, and what it first saw in each cell."""

    def __init__(self, obs: dict):
        self.start_dir = int(obs["direction"])
        self.pos = (0, 0)
        self.faced: set[int] = set()
        """The directions the agent has looked in so far."""
        self.cells: dict[tuple[int, int], ObjRef | None] = {}
        """Start-relative cell -> the object first seen there (None: nothing to name)."""
        self.observe(obs)

    def observe(self, obs: dict) -> None:
        """Note the cells of this view not seen before."""
        image = np.asarray(obs["image"])
        self.faced.add(int(obs["direction"]))
        positions = view_positions(self.pos, int(obs["direction"]))
        for i in range(VIEW):
            for j in range(VIEW):
                kind = IDX_TO_OBJECT[int(image[i, j, 0])]
                if kind == _UNSEEN:
                    continue
                cell = (int(positions[i, j, 0]), int(positions[i, j, 1]))
                if cell not in self.cells:
                    self.cells[cell] = (ObjRef(kind, IDX_TO_COLOR[int(image[i, j, 1])])
                                        if kind in OBJECT_TYPES else None)

    def step(self, action: int, before: dict, after: dict) -> None:
        """Advance the pose by `action`, taken on observation `before`, and note `after`."""
        if action == _FORWARD and enterable(np.asarray(before["image"])[VIEW // 2, VIEW - 2]):
            d = DIR_TO_VEC[int(before["direction"])]
            self.pos = (self.pos[0] + int(d[0]), self.pos[1] + int(d[1]))
        self.observe(after)

    @property
    def looked_around(self) -> bool:
        """Whether the agent has faced all four directions."""
        return len(self.faced) == 4

    def unsettled(self, goal: Goal) -> bool:
        """Whether `goal` names a location that no seen object settles yet."""
        return any(ref is not None and ref.loc is not None and self.resolve(ref) is None
                   for ref in (goal.obj, goal.target))

    def unseen(self, goal: Goal) -> bool:
        """Whether `goal` names an object (its type, and colour when given; locations are
        `unsettled`'s business) that fits none of the objects seen so far."""
        return any(ref is not None and not any(
            obj is not None and ObjRef(ref.type, ref.color).matches(obj)
            for obj in self.cells.values()) for ref in (goal.obj, goal.target))

    def locations(self, cell: tuple[int, int]) -> set[str]:
        """The start-relative locations of a start-relative cell."""
        return start_locations(cell, self.start_dir)

    def resolve(self, ref: ObjRef) -> ObjRef | None:
        """`ref` without its location, made concrete: the colour of the nearest seen object that
        fits `ref`, among colours whose every seen object of that type lies in `ref`'s location
        (so that the colour alone picks out a fitting object). `ref` itself when it has no
        location; None when no seen object settles it yet."""
        if ref.loc is None:
            return ref
        fits: dict[str, int] = {}  # colour -> distance to its nearest fitting object
        spoilt: set[str] = set()  # colours with a seen object outside the location
        for cell, obj in self.cells.items():
            if obj is None or obj.type != ref.type:
                continue
            if ref.color is not None and obj.color != ref.color:
                continue
            if ref.loc in self.locations(cell):
                dist = abs(cell[0] - self.pos[0]) + abs(cell[1] - self.pos[1])
                fits[obj.color] = min(dist, fits.get(obj.color, dist))
            else:
                spoilt.add(obj.color)
        usable = {c: dist for c, dist in fits.items() if c not in spoilt}
        if not usable:
            return None
        color = min(usable, key=lambda c: (usable[c], c))
        return ObjRef(ref.type, color)

    def resolve_goal(self, goal: Goal) -> Goal:
        """`goal` with each object whose location `resolve` settles replaced by its concrete
        reference; objects not settled yet keep their location."""
        obj = self.resolve(goal.obj) or goal.obj
        target = None if goal.target is None else self.resolve(goal.target) or goal.target
        if obj == goal.obj and target == goal.target:
            return goal
        return Goal(goal.verb, obj, target)
