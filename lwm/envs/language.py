"""`LanguageWrapper`: any BabyAI / MiniGrid env with dict observations and text events.

Observations (`LanguageWrapper.observation_space`):

    image      uint8 (7, 7, 3)  minigrid's egocentric symbolic view: (object idx, colour idx, state)
                                per cell; the agent stands at column 3 of the bottom row, facing up
    direction  int in [0, 4)    0 east, 1 south, 2 west, 3 north
    carrying   int64 (2,)       (object idx, colour idx) of what the agent holds, (1, 0) for nothing
    mission    str              the env's own mission text

`info` at reset and after every step carries:

    events        short canonical English sentences of what just happened ("you picked up the red
                  ball", "the blue door is open", "you are in front of the green key", "the red
                  ball is next to the yellow box", "the grey door is locked" on arriving in front
                  of a locked door or toggling it without its key)
    achieved      canonical goal texts (lwm.goals grammar) that became true this step; the state at
                  reset counts as nothing achieved, so a goal already true then is reported at the
                  first step if it still holds
    achieved_locs for each achieved goal, the start-relative locations (lwm.goals.LOCATIONS) of its
                  object and of its target: [[obj_locs], [target_locs]]. Locations follow BabyAI:
                  relative to the agent's pose at reset, for objects in the room it started in.

Achieved goals follow minigrid's instruction verifier: "go to X" when X becomes the cell in front
of the agent, "pick up X" when X is picked up, "open X" when the door X becomes open, "drop X" and
"put X next to Y" (for every object Y beside X) when X is dropped.
"""

from __future__ import annotations

import contextlib
import io
import string
from collections.abc import Collection, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from minigrid.core.constants import COLOR_NAMES, IDX_TO_COLOR, IDX_TO_OBJECT
from minigrid.core.constants import OBJECT_TO_IDX as _OBJECT_TO_IDX

from lwm.envs.spatial import enterable, start_locations
from lwm.goals import OBJECT_TYPES, PORTABLE_TYPES, Goal, ObjRef, keeps_carried, parse_goal

OBJECT_TO_IDX: dict[str, int] = dict(_OBJECT_TO_IDX)
"""minigrid's object type indices (unseen 0, empty 1, wall 2, floor 3, door 4, key 5, ...)."""
NOTHING_CARRIED = (OBJECT_TO_IDX["empty"], 0)
"""The `carrying` observation when the agent holds nothing."""
ACTION_NAMES: tuple[str, ...] = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
"""minigrid's seven discrete actions, by index."""
EXPLORATION_PROBS: tuple[float, ...] = (0.2, 0.2, 0.4, 0.08, 0.06, 0.06, 0.0)
"""A random policy over those actions that mostly moves and never takes the no-op `done`: the
Dyna loop's exploration policy, and the random actions of epsilon-greedy policies."""
_PICKUP, _DROP, _TOGGLE = 3, 4, 5


def affordance_probs(image: np.ndarray, carrying: np.ndarray) -> np.ndarray:
    """An exploration policy that looks at the cell in front: `EXPLORATION_PROBS` for moving,
    but picking up only when facing something portable with empty hands (then often), toggling
    only when facing a door that is not open (then often), dropping only when carrying and
    facing an empty cell. Random actions that do something, so random play picks up objects,
    puts them next to others and opens doors with keys it carries.

    image: (B, 7, 7, 3) symbolic views, the agent at column 3 of the last row facing up;
    carrying: (B, 2) -> (B, 7) action probabilities.
    """
    front = np.asarray(image)[:, 3, 5]  # (B, 3): object index, colour, state
    kind, state = front[:, 0], front[:, 2]
    holding = np.asarray(carrying)[:, 0] != NOTHING_CARRIED[0]
    portable = np.isin(kind, [OBJECT_TO_IDX[t] for t in PORTABLE_TYPES])
    shut_door = (kind == OBJECT_TO_IDX["door"]) & (state != _DOOR_STATE.index("open"))
    probs = np.tile(np.asarray(EXPLORATION_PROBS, dtype=np.float64), (len(front), 1))
    probs[:, _PICKUP] = np.where(portable & ~holding, 0.5, 0.0)
    probs[:, _TOGGLE] = np.where(shut_door, 0.5, 0.0)
    probs[:, _DROP] = np.where(holding & (kind == OBJECT_TO_IDX["empty"]), 0.02, 0.0)
    return probs / probs.sum(1, keepdims=True)


def noop_actions(obs: dict) -> set[str]:
    """Action names that cannot change anything from this lwm observation, by minigrid's rules
    for the cell in front: a step into anything but an empty cell, floor, goal, lava or an open
    door; a pick-up with full hands or nothing portable in front; a drop with empty hands or
    onto an occupied cell; a toggle facing neither a door nor a box (and `done`)."""
    front = np.asarray(obs["image"])[3, 5]
    name = IDX_TO_OBJECT[int(front[0])]
    holding = int(np.asarray(obs["carrying"])[0]) != NOTHING_CARRIED[0]
    noop = {"done"}
    if not enterable(front):
        noop.add("forward")
    if holding or name not in PORTABLE_TYPES:
        noop.add("pickup")
    if not holding or name != "empty":
        noop.add("drop")
    if name not in ("door", "box"):
        noop.add("toggle")
    return noop


DIRECTION_NAMES: tuple[str, ...] = ("east", "south", "west", "north")
MISSION_CHARSET = string.ascii_letters + string.digits + " ,.'-"
MAX_MISSION_LENGTH = 512

_DOOR_STATE = ("open", "closed", "locked")


def _ref(obj) -> ObjRef | None:
    """The goal-grammar reference of a minigrid object, or None when goals can't name it."""
    if obj is None or obj.type not in OBJECT_TYPES:
        return None
    return ObjRef(obj.type, obj.color)


def _name(obj) -> str:
    return f"the {obj.color} {obj.type}"


class LanguageWrapper(gym.Wrapper):
    """Wraps a BabyAI / MiniGrid env: documented dict observations, `events` and `achieved` in info.

    See the module docstring for the observation and info formats. `text_observation()` describes
    the agent's current view in words.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (7, 7, 3), np.uint8),
                "direction": gym.spaces.Discrete(4),
                "carrying": gym.spaces.MultiDiscrete(
                    [len(OBJECT_TO_IDX), len(COLOR_NAMES)], dtype=np.int64
                ),
                "mission": gym.spaces.Text(
                    MAX_MISSION_LENGTH, min_length=0, charset=MISSION_CHARSET
                ),
            }
        )
        self._start_locs: dict[int, frozenset[str]] = {}
        self._first_step = True

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset; `options={"instruction": text}` makes `text` the mission instead of the env's
        own: the env's verifier is switched off for the episode (its mission can no longer end
        it or pay reward), and whoever gave the instruction judges success from `achieved`."""
        options = dict(options or {})
        instruction = options.pop("instruction", None)
        # BabyAI's rejection sampling prints "Sampling rejected: ..." to stdout; keep it quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            obs, info = self.env.reset(seed=seed, options=options or None)
        if instruction is not None:
            if hasattr(self.base, "instrs"):
                self.base.instrs = _NoVerifier()
            self.base.mission = instruction
            obs = dict(obs, mission=instruction)
        self._start_locs = self._compute_start_locs()
        self._first_step = True
        front = self._front()
        events = [f"you are in front of {_name(front)}"] if _ref(front) else []
        if self.base.carrying is not None:
            events.append(f"you are carrying {_name(self.base.carrying)}")
        info = dict(info, events=events, achieved=[], achieved_locs=[])
        return self._observation(obs), info

    def step(self, action):
        env = self.base
        action = int(action)
        front_pos = tuple(int(v) for v in env.front_pos)
        front_before = env.grid.get(*front_pos)
        is_door = front_before is not None and front_before.type == "door"
        open_before = is_door and front_before.is_open
        locked_before = is_door and front_before.is_locked
        carrying_before = env.carrying

        obs, reward, terminated, truncated, info = self.env.step(action)

        events: list[str] = []
        achieved: list[tuple[Goal, object, object]] = []
        carrying = env.carrying
        if carrying is not carrying_before:
            if carrying_before is None:
                events.append(f"you picked up {_name(carrying)}")
                achieved.append((Goal("pick up", _ref(carrying)), carrying, None))
            elif carrying is None:
                events.append(f"you dropped {_name(carrying_before)}")
                achieved.append((Goal("drop", _ref(carrying_before)), carrying_before, None))
                for other in self._neighbours(carrying_before.cur_pos):
                    events.append(f"{_name(carrying_before)} is next to {_name(other)}")
                    achieved.append(
                        (Goal("put next to", _ref(carrying_before), _ref(other)),
                         carrying_before, other)
                    )
        if is_door:
            if front_before.is_open != open_before:
                if front_before.is_open:
                    if locked_before:
                        events.append(f"you unlocked {_name(front_before)}")
                    events.append(f"{_name(front_before)} is open")
                    achieved.append((Goal("open", _ref(front_before)), front_before, None))
                else:
                    events.append(f"{_name(front_before)} is closed")
        elif (
            front_before is not None
            and front_before.type == "box"
            and env.grid.get(*front_pos) is not front_before
            and carrying is carrying_before
        ):
            events.append(f"you opened {_name(front_before)}")
            inside = env.grid.get(*front_pos)
            if inside is not None:
                events.append(f"there was {_name(inside)} in {_name(front_before)}")

        front_after = self._front()
        # The state at reset counts as nothing achieved (see the module docstring).
        previous_front = None if self._first_step else front_before
        if front_after is not previous_front and _ref(front_after) is not None:
            achieved.append((Goal("go to", _ref(front_after)), front_after, None))
        if front_after is not front_before and _ref(front_after) is not None:
            events.append(f"you are in front of {_name(front_after)}")
            if front_after.type == "door" and front_after.is_locked:
                events.append(f"{_name(front_after)} is locked")
        elif is_door and action == env.actions.toggle and front_before.is_locked:
            events.append(f"{_name(front_before)} is locked")  # toggled without its key
        self._first_step = False

        info = dict(
            info,
            events=events,
            achieved=[goal.text for goal, _, _ in achieved],
            achieved_locs=[
                [sorted(self._start_locs.get(id(a), ())), sorted(self._start_locs.get(id(b), ()))]
                for _, a, b in achieved
            ],
        )
        return self._observation(obs), reward, terminated, truncated, info

    # ------------------------------------------------------------------ language

    def text_observation(self) -> str:
        """The agent's current view in words, BALROG-style, for LLM agents and the critic.

        Positions are egocentric: "2 steps forward and 1 step left". Walls are reported only as the
        nearest wall straight ahead, left and right.
        """
        env = self.base
        obs = env.gen_obs()
        image = obs["image"]  # (7, 7, 3), agent at column 3, bottom row 6, facing row 0
        lines = [f"You are facing {DIRECTION_NAMES[env.agent_dir]}."]
        if env.carrying is not None:
            lines.append(f"You are carrying {_name(env.carrying)}.")
        else:
            lines.append("You are carrying nothing.")
        seen: list[tuple[int, str]] = []
        for i in range(7):
            for j in range(7):
                type_name = IDX_TO_OBJECT[int(image[i, j, 0])]
                if type_name in ("unseen", "empty", "wall", "floor") or (i, j) == (3, 6):
                    continue
                color = IDX_TO_COLOR[int(image[i, j, 1])]
                if type_name == "door":
                    desc = f"a {_DOOR_STATE[int(image[i, j, 2])]} {color} door"
                else:
                    desc = f"a {color} {type_name}"
                seen.append((abs(i - 3) + 6 - j, f"{desc} {_where(i - 3, 6 - j)}"))
        for label, cells in (
            ("forward", [(3, j) for j in range(5, -1, -1)]),
            ("left", [(i, 6) for i in range(2, -1, -1)]),
            ("right", [(i, 6) for i in range(4, 7)]),
        ):
            for k, (i, j) in enumerate(cells, start=1):
                if IDX_TO_OBJECT[int(image[i, j, 0])] == "wall":
                    seen.append((k, f"a wall {k} step{'s' if k > 1 else ''} {label}"))
                    break
                if IDX_TO_OBJECT[int(image[i, j, 0])] != "empty":
                    break
        seen.sort(key=lambda t: t[0])
        if seen:
            lines.append("You see " + ", ".join(text for _, text in seen) + ".")
        else:
            lines.append("You see nothing but empty floor.")
        front = self._front()
        if _ref(front) is not None:
            lines.append(f"You are in front of {_name(front)}.")
        return " ".join(lines)

    # ------------------------------------------------------------------ helpers

    @property
    def base(self):
        """The underlying minigrid env."""
        return self.env.unwrapped

    def _front(self):
        env = self.base
        return env.grid.get(*env.front_pos)

    def _observation(self, obs: dict[str, Any]) -> dict[str, Any]:
        carrying = self.base.carrying
        carried = (
            (OBJECT_TO_IDX[carrying.type], COLOR_NAMES.index(carrying.color))
            if carrying is not None
            else NOTHING_CARRIED
        )
        return {
            "image": obs["image"],
            "direction": int(obs["direction"]),
            "carrying": np.array(carried, dtype=np.int64),
            "mission": obs["mission"],
        }

    def _neighbours(self, pos: Sequence[int]) -> list:
        """Objects goals can name in the four cells beside `pos`."""
        env = self.base
        found = []
        for dx, dy in ((1, 0), (0, 1), (-1, 0), (0, -1)):
            x, y = int(pos[0]) + dx, int(pos[1]) + dy
            if 0 <= x < env.grid.width and 0 <= y < env.grid.height:
                cell = env.grid.get(x, y)
                if _ref(cell) is not None:
                    found.append(cell)
        return found

    def _compute_start_locs(self) -> dict[int, frozenset[str]]:
        """BabyAI locations of every object in the start room, relative to the start pose."""
        env = self.base
        if not hasattr(env, "room_from_pos"):
            return {}
        room = env.room_from_pos(*env.agent_pos)
        ax, ay = env.agent_pos
        locs: dict[int, frozenset[str]] = {}
        for x in range(env.grid.width):
            for y in range(env.grid.height):
                cell = env.grid.get(x, y)
                if _ref(cell) is None or not room.pos_inside(x, y):
                    continue
                locs[id(cell)] = frozenset(start_locations((x - ax, y - ay), env.agent_dir))
        return locs


class _NoVerifier:
    """Stands in for a BabyAI instruction whose verifier must not end the episode."""

    def verify(self, action) -> str:
        return "continue"

    def update_objs_poss(self) -> None:
        """BabyAI calls this after a drop; nothing is tracked."""

    def reset_verifier(self, env) -> None:
        """Nothing to reset."""


def _where(right: int, forward: int) -> str:
    parts = []
    if forward:
        parts.append(f"{forward} step{'s' if forward > 1 else ''} forward")
    if right:
        side = "right" if right > 0 else "left"
        n = abs(right)
        parts.append(f"{n} step{'s' if n > 1 else ''} {side}")
    return " and ".join(parts) if parts else "here"


def goal_achieved(goal: Goal, info: dict[str, Any]) -> bool:
    """True when `goal` (concrete or a pattern with colours / locations left open) is among the
    goals `info` (from `LanguageWrapper.step`) reports achieved."""
    for text, (obj_locs, target_locs) in zip(
        info.get("achieved", ()), info.get("achieved_locs", ()), strict=True
    ):
        if goal.matches(parse_goal(text), set(obj_locs), set(target_locs)):
            return True
    return False


def carried(obs: dict) -> ObjRef | None:
    """The object an lwm observation says the agent carries, or None."""
    kind, color = (int(x) for x in np.asarray(obs["carrying"]))
    if (kind, color) == NOTHING_CARRIED:
        return None
    type_name = IDX_TO_OBJECT[kind]
    # `carrying` numbers colours in minigrid's COLOR_NAMES order (alphabetical), not the
    # image's COLOR_TO_IDX order
    return ObjRef(type_name, COLOR_NAMES[color]) if type_name in OBJECT_TYPES else None


def facing(obs: dict) -> ObjRef | None:
    """The object in the cell in front of the agent in an lwm observation, or None."""
    kind, color, _ = (int(v) for v in np.asarray(obs["image"])[3, 5])
    type_name = IDX_TO_OBJECT[kind]
    return ObjRef(type_name, IDX_TO_COLOR[color]) if type_name in OBJECT_TYPES else None


def beside_front(obs: dict, target: ObjRef) -> bool:
    """Whether the cell in front of the agent is empty and lies beside (left, right or beyond
    it, as BabyAI's `pos_next_to` counts) an object matching `target` (type, and colour when it
    has one): where dropping achieves "put ... next to" the target."""
    image = np.asarray(obs["image"])
    if IDX_TO_OBJECT[int(image[3, 5, 0])] != "empty":
        return False
    want = ObjRef(target.type, target.color)
    for x, y in ((2, 5), (4, 5), (3, 4)):
        name = IDX_TO_OBJECT[int(image[x, y, 0])]
        if name in OBJECT_TYPES and want.matches(ObjRef(name, IDX_TO_COLOR[int(image[x, y, 1])])):
            return True
    return False


def forbidden_actions(goal: Goal, obs: dict, locked: Collection[str] = ()) -> set[str]:
    """Action names that can only undo progress on `goal` from this observation: dropping the
    key of the door to open (`lwm.goals.keeps_carried`), or dropping the object of a put
    anywhere but beside its target. Agents rule them out for their planners."""
    holding = carried(obs)
    if keeps_carried(goal, holding, locked):
        return {"drop"}
    if (goal.verb == "put next to" and holding is not None
            and ObjRef(goal.obj.type, goal.obj.color).matches(holding)
            and not beside_front(obs, goal.target)):
        return {"drop"}
    return set()


def locked_doors(obs: dict) -> set[str]:
    """Colours of the locked doors in an lwm observation's view."""
    image = np.asarray(obs["image"])
    locked = (image[..., 0] == OBJECT_TO_IDX["door"]) & (image[..., 2] == _DOOR_STATE.index(
        "locked"))
    return {IDX_TO_COLOR[int(c)] for c in image[..., 1][locked]}


def scene_goals(env) -> list[Goal]:
    """Goals about the objects in `env`'s current grid (a minigrid env, wrapped or not), one per
    distinct (type, colour) and verb, in grid order: go to every object, pick up every portable
    one, open every door that is not open. Stepping stones for exploration, not a check that each
    is reachable."""
    goals: list[Goal] = []
    for obj in env.unwrapped.grid.grid:
        ref = _ref(obj)
        if ref is None:
            continue
        goals.append(Goal("go to", ref))
        if ref.type in PORTABLE_TYPES:
            goals.append(Goal("pick up", ref))
        elif not obj.is_open:
            goals.append(Goal("open", ref))
    return list(dict.fromkeys(goals))


def instr_goals(instrs) -> list[Goal]:
    """The goals of a BabyAI instruction (`env.unwrapped.instrs`) as lwm.goals patterns, in the
    order they must be done ("A after you B" gives [B, A]; "A and B" gives [A, B], either order
    then counts)."""
    from minigrid.envs.babyai.core import verifier as v

    def ref(desc) -> ObjRef:
        return ObjRef(desc.type, desc.color, desc.loc)

    if isinstance(instrs, v.BeforeInstr | v.AndInstr):
        return instr_goals(instrs.instr_a) + instr_goals(instrs.instr_b)
    if isinstance(instrs, v.AfterInstr):
        return instr_goals(instrs.instr_b) + instr_goals(instrs.instr_a)
    if isinstance(instrs, v.GoToInstr):
        return [Goal("go to", ref(instrs.desc))]
    if isinstance(instrs, v.PickupInstr):
        return [Goal("pick up", ref(instrs.desc))]
    if isinstance(instrs, v.OpenInstr):
        return [Goal("open", ref(instrs.desc))]
    if isinstance(instrs, v.PutNextInstr):
        return [Goal("put next to", ref(instrs.desc_move), ref(instrs.desc_fixed))]
    raise TypeError(f"no lwm goal for BabyAI instruction {type(instrs).__name__}")
