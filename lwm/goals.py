"""The canonical goal grammar shared by the environment layer and the language layer.

Every goal lwm reasons about has one canonical English text, and the env layer reports achieved
goals in exactly this grammar:

    go to the {colour} {type}
    pick up the {colour} {type}
    open the {colour} door
    drop the {colour} {type}
    put the {colour} {type} next to the {colour} {type}

`type` is one of ball, box, key (or door for "go to" and "open"); `colour` is one of minigrid's six
colours. A *pattern* may leave the colour out ("go to the ball") and may add a location relative
to where the agent started the episode ("the ball on your left", "the door in front of you",
"the key behind you"), as BabyAI missions do. A pattern matches every concrete goal with the same
verb whose objects fit it. Concrete goals (what the env reports as achieved) always name the
colour and never a location; the env reports each achieved goal's objects' start locations
beside it (both it and the agent's own `lwm.envs.spatial.StartFrame` use
`lwm.envs.spatial.start_locations`).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

COLORS: tuple[str, ...] = ("red", "green", "blue", "purple", "yellow", "grey")
"""minigrid's colour names, in the order of its colour indices."""
OBJECT_TYPES: tuple[str, ...] = ("ball", "box", "key", "door")
"""Object types a goal can name."""
PORTABLE_TYPES: tuple[str, ...] = ("ball", "box", "key")
"""Object types the agent can pick up, drop and put next to things."""
VERBS: tuple[str, ...] = ("go to", "pick up", "open", "drop", "put next to")
"""Goal verbs, in canonical form."""
LOCATIONS: tuple[str, ...] = ("left", "right", "front", "behind")
"""BabyAI's locations, relative to the agent's pose at the start of the episode."""
_LOC_TEXT = {"left": "on your left", "right": "on your right", "front": "in front of you",
             "behind": "behind you"}
LOC_TEXTS: tuple[str, ...] = tuple(_LOC_TEXT.values())
"""How goal texts say each location ("on your left", ...), in the order of `LOCATIONS`."""


class GoalTextError(ValueError):
    """A text is not in the canonical goal grammar."""


@dataclass(frozen=True, order=True)
class ObjRef:
    """An object named by its type and (optionally, in a pattern) its colour."""

    type: str
    color: str | None = None
    loc: str | None = None

    def __post_init__(self) -> None:
        if self.type not in OBJECT_TYPES:
            raise GoalTextError(f"unknown object type {self.type!r}; expected {OBJECT_TYPES}")
        if self.color is not None and self.color not in COLORS:
            raise GoalTextError(f"unknown colour {self.color!r}; expected one of {COLORS}")
        if self.loc is not None and self.loc not in LOCATIONS:
            raise GoalTextError(f"unknown location {self.loc!r}; expected one of {LOCATIONS}")

    @property
    def text(self) -> str:
        """'the red ball', 'the ball' when the colour is left open, 'the ball on your left'."""
        s = f"the {self.color} {self.type}" if self.color else f"the {self.type}"
        return f"{s} {_LOC_TEXT[self.loc]}" if self.loc else s

    def matches(self, other: ObjRef, locs: frozenset[str] | set[str] | None = None) -> bool:
        """True when `other` (concrete) is an object this reference (maybe a pattern) names.

        `locs` are the start-relative locations of `other`; a reference with a location matches
        only when they are given and include it.
        """
        if self.type != other.type or (self.color is not None and self.color != other.color):
            return False
        return self.loc is None or (locs is not None and self.loc in locs)


@dataclass(frozen=True, order=True)
class Goal:
    """One goal: a verb, the object it acts on and, for "put next to", the fixed object."""

    verb: str
    obj: ObjRef
    target: ObjRef | None = None

    def __post_init__(self) -> None:
        if self.verb not in VERBS:
            raise GoalTextError(f"unknown verb {self.verb!r}; expected one of {VERBS}")
        if (self.verb == "put next to") != (self.target is not None):
            raise GoalTextError("'put next to' and only it takes a target object")
        if self.verb == "open" and self.obj.type != "door":
            raise GoalTextError(f"only doors can be opened, not {self.obj.text}")
        if self.verb in ("pick up", "drop", "put next to") and self.obj.type not in PORTABLE_TYPES:
            raise GoalTextError(f"cannot {self.verb} {self.obj.text}: only {PORTABLE_TYPES} move")

    @property
    def text(self) -> str:
        """The canonical text of this goal."""
        if self.verb == "put next to":
            assert self.target is not None
            return f"put {self.obj.text} next to {self.target.text}"
        return f"{self.verb} {self.obj.text}"

    @property
    def is_concrete(self) -> bool:
        """True when every object in the goal names its colour."""
        objs = [self.obj] if self.target is None else [self.obj, self.target]
        return all(o.color is not None and o.loc is None for o in objs)

    def matches(
        self,
        concrete: Goal,
        obj_locs: frozenset[str] | set[str] | None = None,
        target_locs: frozenset[str] | set[str] | None = None,
    ) -> bool:
        """True when the concrete goal `concrete` satisfies this goal (maybe a pattern).

        `obj_locs` / `target_locs` are the start-relative locations of the concrete goal's objects,
        as the env reports them; they matter only for patterns with a location.
        """
        if self.verb != concrete.verb or not self.obj.matches(concrete.obj, obj_locs):
            return False
        if self.target is None:
            return True
        return concrete.target is not None and self.target.matches(concrete.target, target_locs)

    def __str__(self) -> str:
        return self.text


def acting_goal(goal: Goal, carrying: ObjRef | None, locked: Collection[str] = (),
                facing: ObjRef | None = None) -> Goal:
    """The goal to pursue now for `goal`, by BabyAI's preconditions: a put needs its object in
    hand; a door opens only when faced, and a locked one only for the key of its colour in hand.

    carrying: what the agent holds; locked: colours of the locked doors it has seen; facing:
    the object in the cell in front of it. A put of an object not in hand starts by picking it
    up (a location in the put's object cannot be checked on a carried object, so type and colour
    decide). Opening a door seen locked starts by picking up its key ("open the door" when one
    colour of locked door was seen: that door), then, as for any door, by going to it. The steps
    are skills a world model learns early, so agents and the Dyna loop's policy plan for them
    first, then for the goal itself, whose last step is then a single action. Any pick-up needs
    free hands: holding something else, the goal is to drop it first.
    """
    step = _precondition(goal, carrying, locked, facing)
    if (step.verb == "pick up" and carrying is not None
            and not ObjRef(step.obj.type, step.obj.color).matches(carrying)):
        return Goal("drop", carrying)
    return step


def _precondition(goal: Goal, carrying: ObjRef | None, locked: Collection[str],
                  facing: ObjRef | None) -> Goal:
    if goal.verb == "put next to":
        if carrying is not None and ObjRef(goal.obj.type, goal.obj.color).matches(carrying):
            return goal
        return Goal("pick up", goal.obj)
    if goal.verb == "open":
        door = goal.obj
        colors = {door.color} & set(locked) if door.color else set(locked)
        if len(colors) == 1:
            color = colors.pop()
            if carrying != (key := ObjRef("key", color)):
                return Goal("pick up", key)
            door = ObjRef("door", color, door.loc)  # "the door" is the one its key opens
        if facing is None or not ObjRef("door", door.color).matches(facing):
            return Goal("go to", door)
        return Goal("open", door)
    return goal


def keeps_carried(goal: Goal, carrying: ObjRef | None, locked: Collection[str] = ()) -> bool:
    """Whether what the agent carries must stay in hand for `goal`: the key of the door to open
    (of the door's colour, or of the one colour of locked door seen when the goal names none).

    Dropping it can only undo progress (the door then needs the key picked up again), so agents
    rule the drop action out while this holds, instead of relying on the learned values to know.
    """
    if goal.verb != "open" or carrying is None or carrying.type != "key":
        return False
    colors = {goal.obj.color} if goal.obj.color else set(locked)
    return colors == {carrying.color}


_COLOR = "|".join(COLORS)
_TYPE = "|".join(OBJECT_TYPES)
_LOC = "|".join(_LOC_TEXT.values())
_OBJ = rf"the (?:(?P<{{p}}c>{_COLOR}) )?(?P<{{p}}t>{_TYPE})(?: (?P<{{p}}l>{_LOC}))?"
_LOC_FROM_TEXT = {v: k for k, v in _LOC_TEXT.items()}
_GOAL_RE = re.compile(
    rf"^(?:(?P<verb>go to|pick up|open|drop) {_OBJ.format(p='a')}"
    rf"|put {_OBJ.format(p='m')} next to {_OBJ.format(p='f')})$"
)


def parse_goal(text: str) -> Goal:
    """Parse a canonical goal text ("put the red ball next to the blue box") into a `Goal`.

    Only the canonical grammar is accepted (lower case, "the", single spaces); free-form language
    is the language layer's job.
    """
    m = _GOAL_RE.match(text.strip())
    if m is None:
        raise GoalTextError(
            f"{text!r} is not a canonical goal text; expected e.g. 'go to the red ball', "
            "'pick up the blue key', 'open the green door', "
            "'put the red ball next to the yellow box'"
        )
    def obj(p: str) -> ObjRef:
        return ObjRef(m[p + "t"], m[p + "c"], _LOC_FROM_TEXT.get(m[p + "l"]))

    if m["verb"]:
        return Goal(m["verb"], obj("a"))
    return Goal("put next to", obj("m"), obj("f"))


def all_concrete_goals() -> list[Goal]:
    """Every concrete goal of the grammar (the goal vocabulary), in a fixed order."""
    portable = [ObjRef(t, c) for t in PORTABLE_TYPES for c in COLORS]
    doors = [ObjRef("door", c) for c in COLORS]
    goals = [Goal("go to", o) for o in portable + doors]
    goals += [Goal("pick up", o) for o in portable]
    goals += [Goal("open", d) for d in doors]
    goals += [Goal("drop", o) for o in portable]
    goals += [Goal("put next to", a, b) for a in portable for b in portable + doors if a != b]
    return goals
