"""Instruction -> `GoalSpec`: lwm's default parser, and the chat-model parser inside it.

`GrammarFirstParser` (the default) asks a chat model only when it must: BabyAI's grammar parser
answers missions in BabyAI's own grammar (exact, no LLM call), `check_vocabulary` refuses an
instruction that names an object or colour outside the vocabulary (no LLM call), misspelt
vocabulary words are corrected (and the grammar parser gets a second look), and `LLMGoalParser`
parses the rest, its answer mended by `repair_parse` where the instruction allows one reading.

`LLMGoalParser` asks the chat model (any langchain model, or lwm's local one), which answers by
structured output in one of two wire formats: `text` (the default), a list of canonical goal
texts held to the goal grammar by a pattern (`WireParseText`), or `fields`, verb / colour / type
/ location enums per subgoal (`WireParse`), several times the tokens. Its answer is then
grounded: every phrase it marks as unknown (unless all its words are in lwm's vocabulary: small
models sometimes list a synonym they did map, "the blue sphere"), and every subgoal lwm's goal
grammar rejects ("open the red ball"), becomes an `InstructionError` that says what could not be
grounded. Answers are cached per (model, text).
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import ValidationError

from lwm.language.llm import get_chat_model, invoke_structured, model_key
from lwm.language.mission import NotAMissionError, parse_babyai_mission
from lwm.language.prompts import load_prompt, render_prompt
from lwm.language.repair import repair_parse
from lwm.language.spec import GoalSpec, InstructionError, Subgoal
from lwm.language.vocabulary import check_vocabulary, fix_spelling, is_grounded_phrase
from lwm.language.wire import WireParse, WireParseText

__all__ = ["GrammarFirstParser", "LLMGoalParser", "clear_parse_cache", "parse_instruction"]

# Ungroundable instructions are cached too: asking again would give the same answer.
_CACHE: OrderedDict[tuple[str, str], GoalSpec | InstructionError] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4096


def clear_parse_cache() -> None:
    """Forget every cached parse (all models)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _normalize(text: str) -> str:
    return " ".join(text.split())


WIRE_FORMATS: dict[str, tuple[type[WireParse] | type[WireParseText], str]] = {
    "text": (WireParseText, "parse_text_system.txt"),
    "fields": (WireParse, "parse_system.txt"),
}
"""Wire format name -> (answer schema, system prompt file)."""


def ground(answer: WireParse | WireParseText, instruction: str) -> GoalSpec:
    """The `GoalSpec` of a model's answer, or `InstructionError` naming what is not grounded."""
    unknown = [u for u in answer.unknown if not is_grounded_phrase(u)]
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        verb = "is" if len(unknown) == 1 else "are"
        raise InstructionError(
            f"{names} {verb} not an object or action in this task's vocabulary "
            f"(instruction: {instruction!r})"
        )
    if not answer.subgoals:
        raise InstructionError(f"found no goal in {instruction!r}")
    try:
        subgoals = tuple(
            Subgoal.from_goal(s, stage=i) if isinstance(s, str) else s.to_subgoal(stage=i)
            for i, s in enumerate(answer.subgoals)
        )
    except ValidationError as e:
        reason = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise InstructionError(f"{instruction!r} cannot be grounded: {reason}") from e
    return GoalSpec(instruction=instruction, subgoals=subgoals)


class LLMGoalParser:
    """`GoalParser` that asks a chat model; `retries` is how often to re-ask on invalid output,
    `wire` the answer format ("text" or "fields", see the module doc)."""

    def __init__(self, llm: BaseChatModel | str = "local", retries: int = 2,
                 wire: str = "text") -> None:
        if wire not in WIRE_FORMATS:
            raise ValueError(f"unknown wire format {wire!r}; choose from {sorted(WIRE_FORMATS)}")
        self.llm = get_chat_model(llm)
        self.retries = retries
        self.wire = wire

    def parse(self, instruction: str) -> GoalSpec:
        """Parse `instruction`; raises `InstructionError` (ungroundable) or
        `StructuredOutputError` (the model kept answering outside the schema)."""
        text = _normalize(instruction)
        if not text:
            raise InstructionError("the instruction is empty")
        key = (f"{model_key(self.llm)}|{self.wire}", text)
        with _CACHE_LOCK:
            cached = _CACHE.get(key)
            if cached is not None:
                _CACHE.move_to_end(key)
        if isinstance(cached, InstructionError):
            raise cached
        if cached is not None:
            return cached.model_copy(update={"instruction": instruction})
        schema, system = WIRE_FORMATS[self.wire]
        messages = [
            SystemMessage(load_prompt(system)),
            HumanMessage(render_prompt("parse_user.txt", instruction=json.dumps(text))),
        ]
        answer = invoke_structured(self.llm, schema, messages, retries=self.retries)
        try:
            result: GoalSpec | InstructionError = ground(answer, instruction)
        except InstructionError as e:
            result = e
        with _CACHE_LOCK:
            _CACHE[key] = result
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        if isinstance(result, InstructionError):
            raise result
        return result


class GrammarFirstParser:
    """lwm's default `GoalParser`: deterministic stages first, the chat model for the rest.

    1. BabyAI's grammar parser (`parse_babyai_mission`): a mission in BabyAI's grammar gets its
       exact spec, with no LLM call.
    2. `check_vocabulary`: a noun phrase naming an object or colour outside the vocabulary ("the
       moon", "the orange ball") is an `InstructionError`, with no LLM call.
    3. `fix_spelling`: misspelt colours and types are corrected; if that makes the text a BabyAI
       mission, the grammar parser answers it.
    4. `LLMGoalParser` parses the (corrected) text, and `repair_parse` mends its answer where
       the instruction's own words allow one reading (the colour of "open it", a location it
       left out, a "pick up" before a "put" that nobody asked for).

    `answered_by` counts which stage answered each call: "grammar", "grammar after spelling
    fixes", "vocabulary check" or "llm", and "llm, repaired" among the last.
    `llm` is the chat model (for a critic to share).
    """

    def __init__(self, llm: BaseChatModel | str = "local", retries: int = 2,
                 wire: str = "text") -> None:
        self.llm_parser = LLMGoalParser(llm, retries=retries, wire=wire)
        self.llm = self.llm_parser.llm
        self.answered_by: Counter[str] = Counter()

    def parse(self, instruction: str) -> GoalSpec:
        """Parse `instruction`; raises `InstructionError` (ungroundable) or
        `StructuredOutputError` (the chat model kept answering outside the schema)."""
        spec = self._by_grammar(instruction, "grammar")
        if spec is not None:
            return spec
        try:
            check_vocabulary(instruction)
        except InstructionError:
            self.answered_by["vocabulary check"] += 1
            raise
        fixed = fix_spelling(instruction)
        if fixed != instruction:
            spec = self._by_grammar(fixed, "grammar after spelling fixes")
            if spec is not None:
                return spec.model_copy(update={"instruction": instruction})
        self.answered_by["llm"] += 1
        answer = self.llm_parser.parse(fixed)
        spec = repair_parse(answer, fixed)
        if spec.texts != answer.texts:
            self.answered_by["llm, repaired"] += 1
        return spec.model_copy(update={"instruction": instruction})

    def _by_grammar(self, text: str, stage: str) -> GoalSpec | None:
        """The grammar parser's spec of `text`, counted as `stage`; None when `text` is not a
        BabyAI mission. A mission that asks for the impossible raises its `InstructionError`."""
        try:
            spec = parse_babyai_mission(text)
        except NotAMissionError:
            return None
        except InstructionError:
            self.answered_by[stage] += 1
            raise
        self.answered_by[stage] += 1
        return spec


def parse_instruction(instruction: str, llm: BaseChatModel | str = "local",
                      retries: int = 2, wire: str = "text") -> GoalSpec:
    """Parse an instruction into a `GoalSpec` with lwm's default parser (`GrammarFirstParser`:
    BabyAI's grammar parser, then chat model `llm` for what is outside that grammar).

    Raises `InstructionError` naming what cannot be grounded, e.g. "'the moon' is not an object
    in this task's vocabulary".
    """
    return GrammarFirstParser(llm, retries=retries, wire=wire).parse(instruction)
