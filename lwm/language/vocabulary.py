"""The task vocabulary as people write it: the words that name its colours and object types
(synonyms, plurals, typos), and the noun phrases of an instruction that name something outside it.

`GrammarFirstParser` reads an instruction's noun phrases before and after a chat model does:

- `check_vocabulary`: an instruction whose noun phrase names an object or colour outside the
  vocabulary ("go to the moon", "pick up the orange ball") is an `InstructionError` naming it.
  A small LLM tends to map such a phrase onto the nearest real object rather than report it.
- `fix_spelling`: misspelt vocabulary words inside noun phrases are corrected ("the rde bal" ->
  "the red ball"), so a misspelt BabyAI mission is in BabyAI's grammar again.
- `named_objects`: the objects the phrases describe, with colour and location, which
  `lwm.language.repair` holds the chat model's answer to.

A noun phrase starts at a determiner ("the", "a", "an", "any", "some") and ends at its head: the
first word within `MAX_PHRASE_WORDS` that names an object type, or a generic head ("one",
"thing", "left", ...). Punctuation or a function word ("and", "then", "on", ...) ends it early. A
phrase without a head names something outside the vocabulary (unless it is colours alone, "the
red and the blue ball"), and so does one with a colour outside it among its modifiers; other
modifiers ("the nearest red ball") are the parser's to read.

A word one edit (a letter left out, added or wrong, or two neighbours swapped) from a vocabulary
word of three or more letters, with the same first letter, reads as that word. People seldom
mistype the first letter, and requiring it keeps "wall" from reading as "ball"; "bell" still
does. When the likeliest readings name different things, the word is left as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lwm.goals import COLORS, OBJECT_TYPES
from lwm.language.spec import InstructionError, ObjectSpec

__all__ = [
    "COLOR_ALIASES",
    "COLOR_WORDS",
    "MAX_PHRASE_WORDS",
    "TYPE_WORDS",
    "check_vocabulary",
    "fix_spelling",
    "is_grounded_phrase",
    "named_objects",
    "read_word",
    "unknown_objects",
]

COLOR_ALIASES = {"gray": "grey", "violet": "purple"}
"""Other spellings of a colour. The text wire format accepts them too: constrained decoding that
forbids the word the model is about to copy ("the gray key") makes it drop the colour instead."""
COLOR_WORDS: dict[str, str] = {c: c for c in COLORS} | COLOR_ALIASES
"""Word -> the colour it names."""
TYPE_WORDS: dict[str, str] = {
    word: type_
    for type_, words in {
        "ball": ("ball", "sphere", "orb"),
        "box": ("box", "crate", "chest", "carton"),
        "key": ("key",),
        "door": ("door", "doorway", "gate", "entrance"),
    }.items()
    for singular in words
    for word in (singular, singular + ("es" if singular.endswith("x") else "s"))
}
"""Word -> the object type it names: the type, its synonyms, and their plurals."""
assert set(TYPE_WORDS.values()) == set(OBJECT_TYPES)

OTHER_COLORS = frozenset(
    ["orange", "pink", "black", "white", "brown", "cyan", "magenta", "gold", "golden", "silver",
     "beige", "indigo", "turquoise", "maroon", "navy", "crimson", "teal", "lime", "scarlet",
     "olive", "lavender", "tan"]
)
"""Colours people may name that the task's objects never have."""
GENERIC_HEADS = frozenset(
    ["one", "ones", "thing", "things", "object", "objects", "item", "items", "left", "right",
     "front", "back", "middle", "side", "other", "others"]
)
"""Heads that name no type ("the red one", "the one on the left"): the parser reads them in
context."""
DETERMINERS = frozenset(["the", "a", "an", "any", "some"])
SCENE_WORDS = frozenset(["floor", "ground", "room"])
"""Nouns that name the scene every task has, not an object a goal could name."""
PHRASE_ENDS = frozenset(
    ["and", "then", "or", "but", "to", "on", "in", "of", "at", "by", "next", "beside", "near",
     "behind", "after", "before", "it", "is", "are", "please", "you", "your", "for", "with",
     "from", "into", "onto", "over", "up", "down", "that", "which", "there", "here", "first",
     "once", "when", "while", "thanks", "thank", *DETERMINERS]
)
"""Function words: a noun phrase that reaches one without a head has none."""
MAX_PHRASE_WORDS = 4
"""Words after the determiner searched for a head ("the small bright red ball")."""

_TOKEN_RE = re.compile(r"[a-z]+|[^\sa-z]")


def _typo_rank(typed: str, word: str) -> int | None:
    """How `typed` misspells `word` in one edit: 0 for a left-out letter or two neighbours
    swapped (the commonest typing slips), 1 for a wrong or extra letter; None if not one edit."""
    if len(typed) == len(word):
        diff = [i for i in range(len(word)) if typed[i] != word[i]]
        if len(diff) == 1:
            return 1
        swapped = (len(diff) == 2 and diff[1] == diff[0] + 1
                   and typed[diff[0]] == word[diff[1]] and typed[diff[1]] == word[diff[0]])
        return 0 if swapped else None
    if len(word) - len(typed) == 1 and any(word[:i] + word[i + 1:] == typed
                                           for i in range(len(word))):
        return 0
    if len(typed) - len(word) == 1 and any(typed[:i] + typed[i + 1:] == word
                                           for i in range(len(typed))):
        return 1
    return None


def read_word(word: str, words: dict[str, str]) -> str | None:
    """The key of `words` that `word` is, exactly or as a typo (see the module doc);
    None when it is none of them, or when the likeliest typo readings name different things
    ("gren" is "green", not "grey": a left-out letter is likelier than a wrong one)."""
    if word in words:
        return word
    if len(word) < 3:
        return None
    ranked = [(rank, w) for w in words if len(w) >= 3 and w[0] == word[0]
              and (rank := _typo_rank(word, w)) is not None]
    if not ranked:
        return None
    best = min(rank for rank, _ in ranked)
    near = [w for rank, w in ranked if rank == best]
    if len({words[w] for w in near}) != 1:
        return None
    return min(near, key=len)


@dataclass(frozen=True)
class _Word:
    text: str
    span: tuple[int, int]


@dataclass(frozen=True)
class _Phrase:
    """A noun phrase: the determiner, the modifiers, and the head when there is one."""

    determiner: _Word
    modifiers: tuple[_Word, ...]
    head: _Word | None
    after: tuple[str, ...] = ()
    """The words that follow the phrase (where a location is said: "the key on your left")."""

    @property
    def text(self) -> str:
        words = [self.determiner, *self.modifiers, *([self.head] if self.head else [])]
        return " ".join(w.text for w in words)


def _noun_phrases(text: str) -> list[_Phrase]:
    tokens = [_Word(m[0], m.span()) for m in _TOKEN_RE.finditer(text.lower())]
    phrases = []
    for i, det in enumerate(tokens):
        if det.text not in DETERMINERS:
            continue
        modifiers: list[_Word] = []
        head = None
        for word in tokens[i + 1:i + 1 + MAX_PHRASE_WORDS]:
            if not word.text.isalpha() or word.text in PHRASE_ENDS:
                break
            if read_word(word.text, TYPE_WORDS) or word.text in GENERIC_HEADS:
                head = word
                break
            modifiers.append(word)
        if modifiers or head:
            end = i + 1 + len(modifiers) + (head is not None)
            after = tuple(t.text for t in tokens[end:end + _AFTER_WORDS])
            phrases.append(_Phrase(det, tuple(modifiers), head, after))
    return phrases


def unknown_objects(text: str) -> list[str]:
    """What the noun phrases of `text` name outside the vocabulary, one sentence each:
    "'the moon' is not an object in this task's vocabulary"."""
    found = []
    for phrase in _noun_phrases(text):
        other = [m.text for m in phrase.modifiers if m.text in OTHER_COLORS]
        if phrase.head is None:
            if all(read_word(m.text, COLOR_WORDS) for m in phrase.modifiers):
                continue  # colours alone ("the red and the blue ball"): the parser's to read
            if all(m.text in SCENE_WORDS for m in phrase.modifiers):
                continue  # where things are ("lift the key off the floor"), not a goal object
            found.append(f"{phrase.text!r} is not an object in this task's vocabulary")
        elif other:
            found.append(f"{phrase.text!r} is not an object in this task's vocabulary: "
                         f"{other[0]!r} is not one of its colours ({', '.join(COLORS)})")
    return found


LOCATION_WORDS = {
    ("on", "your", "left"): "left", ("to", "your", "left"): "left",
    ("on", "your", "right"): "right", ("to", "your", "right"): "right",
    ("in", "front", "of", "you"): "front", ("ahead", "of", "you"): "front", ("ahead",): "front",
    ("behind", "you"): "behind", ("at", "your", "back"): "behind",
}
"""How a location follows a noun phrase, longest first where one starts another."""
_RELATIVES = (("that", "is"), ("which", "is"), ("that", "'", "s"), ("which", "'", "s"),
              ("thats",))
"""What may stand between a noun phrase and its location ("the box that's on your left")."""
_INTENSIFIERS = ("right", "just", "directly", "straight")
"""Words that may stress a location without changing it ("the key right in front of you")."""
_AFTER_WORDS = max(map(len, _RELATIVES)) + 1 + max(map(len, LOCATION_WORDS))
"""Words kept after a noun phrase: "that's" and the longest location ("in front of you")."""


def _location(after: tuple[str, ...]) -> str | None:
    for relative in _RELATIVES:
        if after[:len(relative)] == relative:
            after = after[len(relative):]
            break
    if after[:1] and after[0] in _INTENSIFIERS and any(
            after[1:1 + len(words)] == words for words in LOCATION_WORDS):
        after = after[1:]
    return next((loc for words, loc in LOCATION_WORDS.items() if after[:len(words)] == words),
                None)


def _phrase_object(phrase: _Phrase) -> tuple[str, ObjectSpec | None] | None:
    """What one noun phrase names (see `named_objects`), or None when it names no type."""
    type_word = phrase.head and read_word(phrase.head.text, TYPE_WORDS)
    if phrase.head is None and all(read_word(m.text, COLOR_WORDS) for m in phrase.modifiers):
        return ("", None)
    if not type_word:
        return None
    colours = {COLOR_WORDS[c] for m in phrase.modifiers if (c := read_word(m.text, COLOR_WORDS))}
    if len(colours) > 1 or any(m.text in OTHER_COLORS for m in phrase.modifiers):
        return (TYPE_WORDS[type_word], None)
    return (TYPE_WORDS[type_word],
            ObjectSpec(type=TYPE_WORDS[type_word], color=next(iter(colours), None),
                       location=_location(phrase.after)))


def named_objects(text: str) -> list[tuple[str, ObjectSpec | None]]:
    """The objects the noun phrases of `text` name, in order, as (type, object): the object
    with the phrase's colour and location ("a ball that is on your left" -> ball, no colour,
    left), or None when its colour cannot be read (two colours, or one outside the
    vocabulary). Colours alone ("the red" in "the red or the blue ball") are ("", None): an
    object of a type said later."""
    return [found for phrase in _noun_phrases(text)
            if (found := _phrase_object(phrase)) is not None]


NEAR_WORDS = (("next", "to"), ("close", "to"), ("beside",), ("near",), ("by",), ("alongside",))
"""Words that say next to what something goes ("leave the box beside the ball")."""


def near_objects(text: str) -> list[ObjectSpec]:
    """The objects named right after a word of nearness ("next to the blue ball"): what a put
    puts things next to."""
    tokens = list(_TOKEN_RE.finditer(text.lower()))
    words = [m[0] for m in tokens]
    index = {m.start(): i for i, m in enumerate(tokens)}  # token position by start offset
    found = []
    for phrase in _noun_phrases(text):
        i = index[phrase.determiner.span[0]]
        if not any(tuple(words[max(0, i - len(w)):i]) == w for w in NEAR_WORDS):
            continue
        named = _phrase_object(phrase)
        if named is not None and named[1] is not None:
            found.append(named[1])
    return found


def check_vocabulary(instruction: str) -> None:
    """Raise `InstructionError` when `instruction` names an object or colour outside the
    vocabulary (see `unknown_objects`)."""
    found = unknown_objects(instruction)
    if found:
        raise InstructionError(f"{'; '.join(found)} (instruction: {instruction!r})")


def fix_spelling(text: str) -> str:
    """`text` with the misspelt colour and type words of its noun phrases corrected
    ("go to the rde bal" -> "go to the red ball"); everything else as written."""
    fixes = []
    for phrase in _noun_phrases(text):
        words = [*phrase.modifiers, *([phrase.head] if phrase.head else [])]
        for word in words:
            fixed = read_word(word.text, TYPE_WORDS if word is phrase.head else COLOR_WORDS)
            if fixed is not None and fixed != word.text:
                fixes.append((word.span, fixed))
    for (start, end), fixed in sorted(fixes, reverse=True):
        text = text[:start] + fixed + text[end:]
    return text


# Words that are part of the vocabulary or carry no content. A phrase the model calls unknown
# but made only of these ("the blue sphere") is a synonym it did ground, not an unknown thing.
_KNOWN_WORDS = frozenset(
    [*COLOR_WORDS, *TYPE_WORDS, "object", "thing", "one", "the", "a", "an", "your", "you", "on",
     "to", "in", "of", "at", "by", "it", "left", "right", "front", "behind", "ahead", "back",
     "next", "beside", "near", "please", "go", "walk", "move", "head", "approach", "reach", "get",
     "find", "visit", "pick", "up", "grab", "take", "fetch", "collect", "lift", "hold", "open",
     "unlock", "drop", "put", "down", "place", "bring", "set", "leave", "release", "then", "and",
     "after", "before", "first", "thank", "thanks", "kindly", "could", "would", "can", "for",
     "me", "i", "like", "want", "hey", "robot", "if", "that", "is", "any", "some", "there",
     "over", "too"]
)


def is_grounded_phrase(phrase: str) -> bool:
    """True when every word of `phrase` is in lwm's vocabulary (or is a filler word)."""
    return all(w in _KNOWN_WORDS for w in re.findall(r"[a-z]+", phrase.lower()))
