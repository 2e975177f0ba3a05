"""Goal specs: what an instruction asks for, as ordered subgoals in lwm's canonical goal grammar.

A `GoalSpec` is the language layer's output and the planner's input. Each `Subgoal` converts to
and from `lwm.goals.Goal`, and its `text` is exactly the canonical text the env layer reports for
achieved goals (or a pattern of it, "pick up the key behind you"), so goal embeddings of specs
and of achieved goals live in the same space.

Order: subgoals are listed in the order they should be done. BabyAI's "A and B" leaves the order
of A and B free; such subgoals share a `stage`. Stages run in order; within a stage, any order.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lwm.goals import Goal, GoalTextError, ObjRef, parse_goal

__all__ = ["GoalParser", "GoalSpec", "InstructionError", "ObjectSpec", "Subgoal"]

Color = Literal["red", "green", "blue", "purple", "yellow", "grey"]
ObjectType = Literal["ball", "box", "key", "door"]
Verb = Literal["go to", "pick up", "open", "drop", "put next to"]
Location = Literal["left", "right", "front", "behind"]


class InstructionError(ValueError):
    """An instruction cannot be grounded in the task's goal vocabulary; the message says why."""


class ObjectSpec(BaseModel):
    """An object a subgoal names: its type, and its colour and start-relative location if given."""

    model_config = ConfigDict(frozen=True)

    type: ObjectType
    color: Color | None = None
    """None when the instruction leaves the colour open ("pick up a key")."""
    location: Location | None = None
    """Where the object was relative to the agent at the start of the episode, if said."""

    @property
    def ref(self) -> ObjRef:
        """This object as an `lwm.goals.ObjRef`."""
        return ObjRef(self.type, self.color, self.location)

    @classmethod
    def from_ref(cls, ref: ObjRef) -> ObjectSpec:
        """The `ObjectSpec` of an `lwm.goals.ObjRef`."""
        return cls(type=ref.type, color=ref.color, location=ref.loc)


class Subgoal(BaseModel):
    """One step of a goal spec: a verb, its object and, for "put next to", the fixed object."""

    model_config = ConfigDict(frozen=True)

    verb: Verb
    object: ObjectSpec
    target: ObjectSpec | None = None
    """The object to put `object` next to; only for "put next to"."""
    stage: int = Field(default=0, ge=0)
    """Position in the order of the spec; subgoals with equal stages may be done in any order."""

    @model_validator(mode="after")
    def _is_a_goal(self) -> Subgoal:
        try:
            self.goal  # noqa: B018 (builds the Goal for its checks)
        except GoalTextError as e:
            raise ValueError(str(e)) from e
        return self

    @property
    def goal(self) -> Goal:
        """This subgoal as an `lwm.goals.Goal` (a pattern when colour is open or location given)."""
        target = self.target.ref if self.target is not None else None
        return Goal(self.verb, self.object.ref, target)

    @property
    def text(self) -> str:
        """The canonical goal text, e.g. 'put the red ball next to the blue box'."""
        return self.goal.text

    @classmethod
    def from_goal(cls, goal: Goal | str, stage: int = 0) -> Subgoal:
        """The subgoal of an `lwm.goals.Goal` or of a canonical goal text."""
        if isinstance(goal, str):
            goal = parse_goal(goal)
        target = ObjectSpec.from_ref(goal.target) if goal.target is not None else None
        return cls(verb=goal.verb, object=ObjectSpec.from_ref(goal.obj), target=target,
                   stage=stage)


class GoalSpec(BaseModel):
    """What an instruction asks for: its subgoals in order (see the module doc on stages)."""

    model_config = ConfigDict(frozen=True)

    instruction: str = ""
    """The instruction the spec was parsed from."""
    subgoals: tuple[Subgoal, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _stages_in_order(self) -> GoalSpec:
        stages = [s.stage for s in self.subgoals]
        if stages[0] != 0 or any(b - a not in (0, 1) for a, b in pairwise(stages)):
            raise ValueError(f"stages must start at 0 and grow by 0 or 1 at a time, got {stages}")
        return self

    @property
    def goals(self) -> list[Goal]:
        """The subgoals as `lwm.goals.Goal`s, in order."""
        return [s.goal for s in self.subgoals]

    @property
    def texts(self) -> list[str]:
        """The subgoals' canonical texts, in order."""
        return [s.text for s in self.subgoals]

    @classmethod
    def from_texts(cls, texts: list[str], instruction: str = "") -> GoalSpec:
        """A spec whose subgoals are canonical goal texts to be done one after the other."""
        return cls(instruction=instruction,
                   subgoals=tuple(Subgoal.from_goal(t, stage=i) for i, t in enumerate(texts)))

    def __str__(self) -> str:
        groups: dict[int, list[str]] = {}
        for s in self.subgoals:
            groups.setdefault(s.stage, []).append(s.text)
        return ", then ".join(" and ".join(g) for g in groups.values())


@runtime_checkable
class GoalParser(Protocol):
    """Turns an instruction into a `GoalSpec`, or raises `InstructionError` saying why not."""

    def parse(self, instruction: str) -> GoalSpec:
        """Parse `instruction` into a `GoalSpec`."""
        raise NotImplementedError("GoalParser.parse(instruction: str) -> GoalSpec")
