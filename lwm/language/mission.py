"""A deterministic parser for BabyAI's own mission grammar: the no-LLM baseline.

BabyAI generates missions from a small grammar (minigrid `envs/babyai/core/verifier.py`):

    mission := clauses | clauses ", then " clauses | clauses " after you " clauses
    clauses := action | action " and " action          (both, in any order)
    action  := "go to " obj | "pick up " obj | "open " obj | "put " obj " next to " obj
    obj     := ("the" | "a") [colour] type [" on your left" | " on your right"
               | " in front of you" | " behind you"]

"A after you B" means B first. This parser reads exactly that grammar (plus lwm's "drop", and
ignoring case, extra spaces and a final full stop); it is a parser, not a language model. Text
outside the grammar is a `NotAMissionError`; a mission of the grammar that asks for the
impossible ("open the red ball") is an `InstructionError` of its own.
"""

from __future__ import annotations

import re

from lwm.goals import COLORS, OBJECT_TYPES, Goal, GoalTextError, ObjRef
from lwm.language.spec import GoalSpec, InstructionError, Subgoal

__all__ = ["BabyAIMissionParser", "NotAMissionError", "parse_babyai_mission"]


class NotAMissionError(InstructionError):
    """The text is not in BabyAI's mission grammar (another parser may still read it)."""


_LOCATIONS = {"on your left": "left", "on your right": "right", "in front of you": "front",
              "behind you": "behind"}
_OBJ_RE = re.compile(
    rf"^(?:the|a|an) (?:(?P<color>{'|'.join(COLORS)}) )?(?P<type>{'|'.join(OBJECT_TYPES)})"
    rf"(?: (?P<loc>{'|'.join(_LOCATIONS)}))?$"
)
_ACTION_RE = re.compile(r"^(?:(?P<verb>go to|pick up|open|drop) (?P<obj>.+)"
                        r"|put (?P<moved>.+?) next to (?P<fixed>.+))$")


def _obj(phrase: str) -> ObjRef:
    m = _OBJ_RE.match(phrase)
    if m is None:
        raise NotAMissionError(f"{phrase!r} is not an object in this task's vocabulary "
                               f"(a colour of {COLORS} and a type of {OBJECT_TYPES})")
    return ObjRef(m["type"], m["color"], _LOCATIONS.get(m["loc"]))


def _action(clause: str) -> Goal:
    m = _ACTION_RE.match(clause)
    if m is None:
        raise NotAMissionError(
            f"{clause!r} is not a BabyAI mission clause; expected 'go to ...', 'pick up ...', "
            "'open ...', 'drop ...' or 'put ... next to ...'"
        )
    try:
        if m["verb"]:
            return Goal(m["verb"], _obj(m["obj"]))
        return Goal("put next to", _obj(m["moved"]), _obj(m["fixed"]))
    except GoalTextError as e:
        raise InstructionError(f"{clause!r}: {e}") from e


def parse_babyai_mission(mission: str) -> GoalSpec:
    """Parse a mission of BabyAI's grammar ("open the door, then go to a red ball") into a spec."""
    text = " ".join(mission.lower().split()).rstrip(".")
    if ", then " in text:
        first, _, second = text.partition(", then ")
        groups = [first, second]
    elif " after you " in text:
        later, _, earlier = text.partition(" after you ")
        groups = [earlier, later]
    else:
        groups = [text]
    subgoals = [
        Subgoal.from_goal(_action(clause), stage=stage)
        for stage, group in enumerate(groups)
        for clause in group.split(" and ")
    ]
    return GoalSpec(instruction=mission, subgoals=tuple(subgoals))


class BabyAIMissionParser:
    """`GoalParser` for BabyAI's mission grammar (deterministic; see `parse_babyai_mission`)."""

    def parse(self, instruction: str) -> GoalSpec:
        """Parse `instruction`, which must be in BabyAI's mission grammar."""
        return parse_babyai_mission(instruction)
