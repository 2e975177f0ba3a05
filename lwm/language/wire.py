"""The JSON shapes an LLM fills in, and their conversion to goal specs.

These differ from `lwm.language.spec` on purpose: every field is required and an open colour or
location is a word ("any", "anywhere") rather than a missing key, because constrained decoding
with small models is most reliable when each field is always present and every choice is an
enum. A subgoal is one of two shapes, so only "put next to" has a target and the model cannot
attach one to another verb. Arrays carry `maxItems` (pydantic `max_length`) so a small model
cannot loop on an item.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from lwm.goals import COLORS, LOC_TEXTS, OBJECT_TYPES, PORTABLE_TYPES
from lwm.language.spec import ObjectSpec, Subgoal
from lwm.language.vocabulary import COLOR_ALIASES

__all__ = [
    "MAX_SUBGOALS",
    "WireAction",
    "WireCheck",
    "WireCritique",
    "WireObject",
    "WireParse",
    "WireParseText",
    "WirePut",
    "WireRevision",
    "WireSubgoal",
    "canonical_goal_pattern",
]

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


class WireAction(BaseModel):
    """A one-object subgoal."""

    verb: Literal["go to", "pick up", "open", "drop"]
    object: WireObject

    def to_subgoal(self, stage: int) -> Subgoal:
        """The `Subgoal` this states, at `stage` (ValidationError if ill-formed)."""
        return Subgoal(verb=self.verb, object=self.object.to_spec(), stage=stage)


class WirePut(BaseModel):
    """Put `object` next to `target`."""

    verb: Literal["put next to"]
    object: WireObject
    target: WireObject

    def to_subgoal(self, stage: int) -> Subgoal:
        """The `Subgoal` this states, at `stage` (ValidationError if ill-formed)."""
        return Subgoal(verb=self.verb, object=self.object.to_spec(),
                       target=self.target.to_spec(), stage=stage)


WireSubgoal = WireAction | WirePut


class WireParse(BaseModel):
    """The LLM's reading of an instruction. `unknown` comes after the subgoals, so the model
    lists only what it could not fit into them."""

    subgoals: list[WireSubgoal] = Field(max_length=MAX_SUBGOALS)
    unknown: list[Annotated[str, Field(max_length=40)]] = Field(
        max_length=3, description="phrases naming things outside the vocabulary, as written"
    )


def canonical_goal_pattern() -> str:
    """A regular expression matching exactly the goal texts `lwm.goals.parse_goal` accepts that
    are well-typed subgoals ("pick up", "drop" and "put" only portable objects, "open" only
    doors), with the colour spellings of `COLOR_ALIASES`.

    Plain groups only (llama-cpp-python's JSON-schema converter rejects "(?:" and named
    groups), so it becomes a grammar and constrained decoding can emit nothing else.
    """
    color = f"( ({'|'.join([*COLORS, *COLOR_ALIASES])}))?"
    loc = f"( ({'|'.join(LOC_TEXTS)}))?"

    def obj(types: tuple[str, ...]) -> str:
        return f"the{color} ({'|'.join(types)}){loc}"

    return (f"^(go to {obj(OBJECT_TYPES)}|(pick up|drop) {obj(PORTABLE_TYPES)}"
            f"|open {obj(('door',))}|put {obj(PORTABLE_TYPES)} next to {obj(OBJECT_TYPES)})$")


def _canonical_colour_words(texts: list[str]) -> list[str]:
    """'the gray key' -> 'the grey key' (see `COLOR_ALIASES`)."""
    return [" ".join(COLOR_ALIASES.get(w, w) for w in t.split(" ")) for t in texts]


class WireParseText(BaseModel):
    """The LLM's reading of an instruction as canonical goal texts, the compact format.

    "pick up the red ball" is 5 tokens where the field format (`WireParse`) needs about 30, and
    generation time on a CPU is nearly linear in tokens. Each text is held to the goal grammar
    by a pattern, so constrained decoding cannot write an ill-formed or ill-typed subgoal.
    """

    subgoals: list[Annotated[str, Field(pattern=canonical_goal_pattern())]] = Field(
        max_length=MAX_SUBGOALS)
    unknown: list[Annotated[str, Field(max_length=40)]] = Field(
        max_length=3, description="phrases naming things outside the vocabulary, as written"
    )

    @field_validator("subgoals")
    @classmethod
    def _canonical_colours(cls, texts: list[str]) -> list[str]:
        return _canonical_colour_words(texts)


class WireCheck(BaseModel):
    """Whether the real trace achieves one subgoal, with the event that shows it."""

    subgoal: int = Field(ge=1, le=MAX_SUBGOALS, description="the subgoal's number")
    event: str = Field(max_length=100,
                       description="the real event achieving it, copied exactly; 'none' if none")
    done: bool


class WireCritique(BaseModel):
    """The LLM's verdict on an episode: one check per subgoal, then a reason and what is left.

    Checks come first so the verdict follows from evidence the model has just written down.
    """

    checks: list[WireCheck] = Field(max_length=MAX_SUBGOALS)
    reason: str = Field(max_length=200)
    revised_subgoals: list[WireSubgoal] | None = Field(max_length=MAX_SUBGOALS)


class WireRevision(BaseModel):
    """The LLM's answer when an episode fell short: the subgoals still to be done, as canonical
    goal texts in order (the compact format of `WireParseText`). Whether each subgoal was done is
    not asked: lwm reads that from the real trace itself (`lwm.language.critic`)."""

    remaining: list[Annotated[str, Field(pattern=canonical_goal_pattern())]] = Field(
        max_length=MAX_SUBGOALS, description="the subgoals still to be done, in order")

    @field_validator("remaining")
    @classmethod
    def _canonical_colours(cls, texts: list[str]) -> list[str]:
        return _canonical_colour_words(texts)
