"""The JSON shapes an LLM fills in, and their conversion to goal specs.

These differ from `lwm.language.spec` on purpose: every field is required and an open colour or
location is a word ("any", "anywhere") rather than a missing key, because constrained decoding
with small models is most reliable when each field is always present and every choice is an
enum. Arrays carry `maxItems` (pydantic `max_length`) so a small model cannot loop on an item.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from lwm.language.spec import ObjectSpec, Subgoal, Verb

__all__ = ["MAX_SUBGOALS", "WireCritique", "WireObject", "WireParse", "WireSubgoal"]

MAX_SUBGOALS = 4
"""Most subgoals an LLM may return; BabyAI's longest missions have four actions."""


class WireObject(BaseModel):
    """An object as the LLM names it."""

    color: Literal["red", "green", "blue", "purple", "yellow", "grey", "any"]
    type: Literal["ball", "box", "key", "door"]
    location: Literal["left", "right", "front", "behind", "anywhere"]

    def to_spec(self) -> ObjectSpec:
        """The `ObjectSpec` this names."""
        return ObjectSpec(
            type=self.type,
            color=None if self.color == "any" else self.color,
            location=None if self.location == "anywhere" else self.location,
        )


class WireSubgoal(BaseModel):
    """A subgoal as the LLM states it."""

    verb: Verb
    object: WireObject
    target: WireObject | None = Field(
        description="the object to put next to, for 'put next to'; null otherwise"
    )

    def to_subgoal(self, stage: int) -> Subgoal:
        """The `Subgoal` this states, at position `stage` (raises ValueError if ill-formed)."""
        target = self.target.to_spec() if self.target is not None else None
        return Subgoal(verb=self.verb, object=self.object.to_spec(), target=target, stage=stage)


class WireParse(BaseModel):
    """The LLM's reading of an instruction."""

    unknown: list[Annotated[str, Field(max_length=40)]] = Field(
        max_length=3, description="phrases naming things outside the vocabulary, as written"
    )
    subgoals: list[WireSubgoal] = Field(max_length=MAX_SUBGOALS)


class WireCritique(BaseModel):
    """The LLM's verdict on an episode; the reason comes first so the verdict can follow it."""

    reason: str = Field(max_length=300)
    success: bool
    revised_subgoals: list[WireSubgoal] | None = Field(max_length=MAX_SUBGOALS)
