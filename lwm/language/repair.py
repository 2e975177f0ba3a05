"""Deterministic repairs of a chat model's parse, against the instruction's own words.

A small model reads most instructions right and slips on a detail the instruction states
plainly. Each repair changes its answer only where the instruction's words allow one reading:

- objects: an object of the answer that no noun phrase of the instruction describes takes the
  colour and location of the instruction's phrases of its type, when they all describe the same
  one ("walk to the green door and then unlock it": "open the door" -> "open the green door");
- implied steps: "pick up X" or "go to X" just before a "put" that moves X or puts something
  next to it is dropped when no word of the instruction asks for that step ("bring the grey
  ball by the green key" is one subgoal: putting includes picking up and walking there); a
  "drop X" just before or after a "put" of X is dropped whatever the words: a put ends by
  dropping what it moves ("drop off the blue key next to the red ball" is one put);
- verbs: "open" becomes "go to" when no word of the instruction is about opening ("find the
  purple door"); "put X next to Y" becomes "go to X" when the instruction names no object of
  Y's type and no word of it is about putting: the model invented Y ("could you move next to
  the green key?" is not "put the green key next to the green box"), and so does a put of an
  object next to itself ("i want you standing next to the yellow key");
- put arguments: a put whose moved object is the one the instruction names right after "next
  to", "beside", "near", ... (and whose target is not) has them swapped back ("leave the red
  box beside the blue ball" moves the red box);
- order: the subgoal whose object a "once / after / when / but first ..." clause names comes
  first ("go to the yellow ball once you are holding the green key"), the one a "before / prior
  to ..." clause names comes last ("before you open the yellow door, pick up the blue ball"),
  and a "go to" of the door such a clause says to open becomes its opening.

Words are read through typos as `lwm.language.vocabulary` reads them ("opne" is about opening).
"""

from __future__ import annotations

import re

from lwm.language.spec import GoalSpec, ObjectSpec, Subgoal
from lwm.language.vocabulary import named_objects, near_objects, read_word

__all__ = ["GO_WORDS", "OPEN_WORDS", "PICK_WORDS", "PUT_WORDS", "repair_parse"]

PICK_WORDS = frozenset(
    ["pick", "picks", "picking", "picked", "grab", "grabbing", "take", "taking", "get", "getting",
     "fetch", "fetching", "collect", "collecting", "lift", "lifting", "snatch", "hold", "have"]
)
"""Words that ask for a pick-up as a step of its own ("carry" is left out: carrying something
somewhere is a put)."""
GO_WORDS = frozenset(
    ["go", "goes", "going", "walk", "walking", "head", "heading", "approach", "reach", "find",
     "visit", "navigate", "travel", "come"]
)
"""Words that ask for going somewhere as a step of its own ("move" is left out: "move the box
near the door" is a put)."""
OPEN_WORDS = frozenset(
    ["open", "opens", "opened", "opening", "unlock", "unlocks", "unlocked", "unlocking", "unbolt",
     "unbolted"]
)
"""Words about opening."""
PUT_WORDS = frozenset(
    ["put", "puts", "putting", "place", "placing", "set", "leave", "leaving", "bring", "bringing",
     "drop", "dropping", "position", "carry", "carrying", "slide", "push", "lay", "deliver"]
)
"""Words about putting something somewhere ("move" is left out: "move next to the key" is a go
to, while "move the box near the door" names both objects of its put)."""


def _says(words: set[str], asking: frozenset[str]) -> bool:
    """True when one of `words` is one of `asking`, or a typo of one ("opne")."""
    table = dict.fromkeys(asking, "")
    return any(read_word(w, table) is not None for w in words)


LOCATION_MENTIONS = {"left": {"left"}, "right": {"right"}, "front": {"front", "ahead"},
                     "behind": {"behind", "back"}}
"""Words without which an instruction cannot mean each location."""


def _described(obj: ObjectSpec, named: list[tuple[str, ObjectSpec | None]],
               words: set[str]) -> ObjectSpec:
    """`obj`, or the one object the instruction's phrases of its type describe. A location of
    `obj` that the phrases do not read stays when the instruction has a word for it (a way of
    saying where that the phrase reader does not know)."""
    phrases = [o for t, o in named if t in (obj.type, "")]
    if not phrases or None in phrases or obj in phrases or len(set(phrases)) != 1:
        return obj
    said = phrases[0]
    if said.location is None and obj.location is not None and (
            LOCATION_MENTIONS[obj.location] & words):
        return said.model_copy(update={"location": obj.location})
    return said


def _swapped(obj: ObjectSpec, target: ObjectSpec, near: list[ObjectSpec]) -> bool:
    """True when a put's object is the one the instruction says things go next to, and its
    target is not: the model swapped them ("leave the red box beside the blue ball")."""
    def said(o: ObjectSpec) -> bool:
        return any(n.type == o.type and n.color == o.color for n in near)

    return len(near) == 1 and said(obj) and not said(target)


def _implied(step: Subgoal, put: Subgoal, words: set[str]) -> bool:
    """True when `step`, just before `put`, is part of it and not asked for in `words`."""
    if put.verb != "put next to":
        return False
    if step.verb == "drop":
        return step.object == put.object
    if step.verb == "pick up":
        return step.object == put.object and not _says(words, PICK_WORDS)
    if step.verb == "go to":
        return step.object in (put.object, put.target) and not _says(words, GO_WORDS)
    return False


def repair_parse(spec: GoalSpec, instruction: str) -> GoalSpec:
    """`spec` (a chat model's parse of `instruction`) with the repairs of the module doc."""
    words = set(re.findall(r"[a-z]+", instruction.lower()))
    named = named_objects(instruction)
    subgoals = []
    named_types = {t for t, _ in named}
    near = near_objects(instruction)
    for s in spec.subgoals:
        verb = "go to" if s.verb == "open" and not _says(words, OPEN_WORDS) else s.verb
        target = _described(s.target, named, words) if s.target is not None else None
        if (verb == "put next to" and target.type not in named_types
                and not _says(words, PUT_WORDS)):
            verb, target = "go to", None  # the model invented the second object
        if verb == "put next to" and target == s.object:
            verb, target = "go to", None  # nothing goes next to itself: "standing next to" X
        obj = _described(s.object, named, words)
        if verb == "put next to" and _swapped(obj, target, near):
            obj, target = target, obj  # the thing it goes next to is the one it moves
        subgoals.append(Subgoal(verb=verb, object=obj, target=target, stage=s.stage))
    kept = [s for before, s, after in zip([None, *subgoals[:-1]], subgoals,
                                          [*subgoals[1:], None], strict=True)
            if not (after is not None and _implied(s, after, words))
            and not (before is not None and s.verb == "drop" and _implied(s, before, words))]
    kept = _clause_order(kept, instruction)
    stages = {stage: i for i, stage in enumerate(sorted({s.stage for s in kept}))}
    return spec.model_copy(update={"subgoals": tuple(
        s.model_copy(update={"stage": stages[s.stage]}) for s in kept)})


_FIRST = re.compile(
    r"\b(?:once|after(?!\s+(?:that|this|which|it|those)\b)|when|as soon as|but first|first)"
    r"\b([^,.;]*)")
"""Clauses that name what is done first: "once you have X", "after you X" (not "after that"),
"when you are done X", "... but first X"."""
_LAST = re.compile(r"\b(?:before|prior to)\b([^,.;]*)")
"""Clauses that name what is done after the rest: "before you X", "prior to X"."""


def _clause_order(subgoals: list[Subgoal], instruction: str) -> list[Subgoal]:
    """`subgoals` reordered by the instruction's order words: the subgoal whose object a
    "once / after / when / but first" clause names moves first, the one a "before / prior to"
    clause names moves last, when exactly one subgoal matches ("go to the red ball once you
    are holding the key": the key first; "before you open the yellow door, pick up the blue
    ball": the door last). A "go to" of the door such a clause says to open becomes its
    opening, when no subgoal opens it already."""
    if len({s.stage for s in subgoals}) != len(subgoals) or len(subgoals) < 2:
        return subgoals
    text = instruction.lower()
    for pattern, last in ((_FIRST, False), (_LAST, True)):
        clause = pattern.search(text)
        if clause is None:
            continue
        named = [o for _, o in named_objects(clause.group(1)) if o is not None]
        hits = [s for s in subgoals
                if any((o.type, o.color) == (s.object.type, s.object.color) for o in named)]
        if len(hits) != 1:
            continue
        hit = hits[0]
        words = set(re.findall(r"[a-z]+", clause.group(1)))
        if (hit.verb == "go to" and hit.object.type == "door" and _says(words, OPEN_WORDS)
                and not any(s.verb == "open" and s.object == hit.object for s in subgoals)):
            opened = hit.model_copy(update={"verb": "open"})
            subgoals = [opened if s is hit else s for s in subgoals]
            hit = opened
        rest = [s for s in subgoals if s is not hit]
        subgoals = [*rest, hit] if last else [hit, *rest]
        subgoals = [s.model_copy(update={"stage": i}) for i, s in enumerate(subgoals)]
    return subgoals
