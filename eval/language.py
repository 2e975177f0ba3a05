"""Benchmark of the language layer: parse accuracy, critic accuracy and latency per call.

    python eval/language.py --json eval/results/language.json
    python eval/language.py --models grammar,local --kinds paraphrase,ungroundable --limit 20
    python eval/language.py --models local --wire text,fields --parsers llm --no-critic
    python eval/language.py --models local --kinds grammar --limit 1 --critics evidence-first

Parsers: `grammar` (BabyAI's mission grammar, deterministic, no LLM) and chat models by
`get_chat_model` spec ("local" = Qwen2.5-Coder-1.5B, "local:qwen2.5-coder-0.5b", or a provider
string). Each chat model parses in two ways (`--parsers`): `llm`, the chat model alone
(`LLMGoalParser`), and `grammar-first`, lwm's default (`GrammarFirstParser`: BabyAI's grammar
parser, a vocabulary check and spelling fixes first, the chat model only for the rest); the
report counts the chat-model calls each made and which stage answered.

Suites: `tasks/parse_suite.yaml` (exact match of the ordered canonical subgoal texts; an
ungroundable instruction is right when it raises an `InstructionError` naming the expected word)
and `tasks/critic_suite.yaml` (verdict = label; on failed episodes, whether the revision is what
is left to do), the latter for chat models only, asked in two ways (`--critics`): `llm`, the whole
verdict from the model (`LLMCritic`), and `evidence-first`, lwm's default (`EvidenceFirstCritic`:
the verdict read from the trace, the model asked only what is left after a failure). Chat
models parse in each `--wire` format (`lwm.language.parse.WIRE_FORMATS`: canonical goal texts,
or enum fields per subgoal); each format's system prompt is evaluated once before timing, as it
is in a long-running agent, so latency is per instruction with the prompt prefix cached. The
parse cache is cleared before each parser's run, so neither answers from the other's calls.

Latency is wall time per call on whatever else the machine is running; the load average at the
start and end of each section is recorded beside it. Parsers of one model run one after the
other in one process, so their figures are on the same load as far as the machine allows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from langchain_core.callbacks import BaseCallbackHandler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lwm.language import (  # noqa: E402
    EvidenceFirstCritic,
    GrammarFirstParser,
    InstructionError,
    LLMCritic,
    LLMGoalParser,
    StructuredOutputError,
    clear_parse_cache,
    get_chat_model,
    parse_babyai_mission,
)
from lwm.language.critic import check_trace, remaining_subgoals  # noqa: E402
from lwm.report import machine_info, write_json  # noqa: E402
from lwm.resources import files  # noqa: E402

SEED = 0
"""llama.cpp's sampling seed (decoding is greedy, temperature 0, so it matters little)."""


def load_suite(name: str) -> list[dict[str, Any]]:
    """Items of a suite YAML in tasks/."""
    return yaml.safe_load(files("tasks").joinpath(name).read_text())["items"]


PARSERS = {"llm": LLMGoalParser, "grammar-first": GrammarFirstParser}
"""How a chat model is asked: alone, or behind lwm's deterministic stages (the default)."""


class _LLMCalls(BaseCallbackHandler):
    """Counts chat-model calls (each retry is a call)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_chat_model_start(self, serialized, messages, **kwargs: Any) -> None:
        self.calls += 1


def _latency(times: list[float]) -> dict[str, float]:
    if not times:
        return {}
    ordered = sorted(times)
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "p90_s": ordered[int(0.9 * (len(ordered) - 1))], "calls": len(times)}


def run_parse(parse, items: list[dict[str, Any]],
              llm_calls: _LLMCalls | None = None) -> dict[str, Any]:
    """Exact-match accuracy of `parse` (text → GoalSpec) per kind, with every miss listed, and
    latency per kind and overall; with `llm_calls`, the chat-model calls made per kind and the
    latency of the items that made one."""
    per_kind: dict[str, list[bool]] = {}
    times: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    llm_times: list[float] = []
    misses = []
    load_start = os.getloadavg()[0]
    for item in items:
        kind = item["kind"]
        calls_before = llm_calls.calls if llm_calls else 0
        start = time.perf_counter()
        try:
            got: Any = parse(item["text"]).texts
        except (InstructionError, StructuredOutputError) as e:
            got = f"error: {e}"
        times.setdefault(kind, []).append(time.perf_counter() - start)
        if llm_calls and llm_calls.calls > calls_before:
            calls[kind] = calls.get(kind, 0) + llm_calls.calls - calls_before
            llm_times.append(times[kind][-1])
        if kind == "ungroundable":
            ok = isinstance(got, str) and item["expected_error"] in got.lower()
        else:
            ok = got == item["expected"]
        per_kind.setdefault(kind, []).append(ok)
        if not ok:
            misses.append({"text": item["text"], "expected": item.get("expected")
                           or item["expected_error"], "got": got})
        print(f"  parse {'ok  ' if ok else 'MISS'} {times[kind][-1]:6.2f}s {item['text']!r} "
              f"-> {got}", file=sys.stderr)
    result = {
        "accuracy": {k: sum(v) / len(v) for k, v in per_kind.items()},
        "counts": {k: len(v) for k, v in per_kind.items()},
        "latency": _latency([t for v in times.values() for t in v]),
        "latency_per_kind": {k: _latency(v) for k, v in times.items()},
        "loadavg_1min": [load_start, os.getloadavg()[0]],
        "misses": misses,
    }
    if llm_calls:
        result["llm_calls"] = calls
        result["latency_with_llm"] = _latency(llm_times)
    return result


def expected_remaining(item: dict[str, Any]) -> list[str] | None:
    """What a failed episode still has to do: the item's label ('misread' items), else the
    spec's subgoals the real trace does not achieve in order (`remaining_subgoals`)."""
    if item["success"]:
        return None
    if "expected_remaining" in item:
        return list(item["expected_remaining"])
    spec = parse_babyai_mission(item["spec"])
    return remaining_subgoals(spec, check_trace(spec, item["trace"]), item["instruction"]).texts


def run_critic(critic, items: list[dict[str, Any]],
               llm_calls: _LLMCalls | None = None) -> dict[str, Any]:
    """Verdict accuracy of `critic` over labelled traces, per category; on failed episodes, how
    often its revision is what is left to do (`expected_remaining`); latency per item and on
    the items that made a chat-model call."""
    per_cat: dict[str, list[bool]] = {}
    revisions: dict[str, list[bool]] = {}
    times: list[float] = []
    llm_times: list[float] = []
    calls = 0
    misses = []
    load_start = os.getloadavg()[0]
    for item in items:
        spec = parse_babyai_mission(item["spec"])
        before = llm_calls.calls if llm_calls is not None else 0
        start = time.perf_counter()
        revised = None
        try:
            verdict = critic.critique(item["instruction"], spec, item["trace"],
                                      item.get("imagined"))
            got, reason = verdict.success, verdict.reason
            revised = verdict.revised_subgoals.texts if verdict.revised_subgoals else None
        except StructuredOutputError as e:
            got, reason = None, str(e)
        times.append(time.perf_counter() - start)
        made = (llm_calls.calls - before) if llm_calls is not None else 0
        calls += made
        if made:
            llm_times.append(times[-1])
        ok = got == item["success"]
        per_cat.setdefault(item["category"], []).append(ok)
        want = expected_remaining(item)
        if want is not None:
            revisions.setdefault(item["category"], []).append(revised == want)
        if not ok or (want is not None and revised != want):
            misses.append({"instruction": item["instruction"], "trace": item["trace"],
                           "expected": item["success"], "got": got, "reason": reason,
                           "expected_remaining": want, "revised": revised})
        print(f"  critic {'ok  ' if ok else 'MISS'} {times[-1]:6.2f}s {item['category']}: "
              f"{got} ({reason})" + ("" if want is None else
                                     f" revised {'ok' if revised == want else 'MISS'} {revised}"),
              file=sys.stderr)
    every = [ok for v in per_cat.values() for ok in v]
    every_rev = [ok for v in revisions.values() for ok in v]
    return {
        "accuracy": sum(every) / len(every) if every else None,
        "per_category": {k: sum(v) / len(v) for k, v in per_cat.items()},
        "counts": {k: len(v) for k, v in per_cat.items()},
        "revision_accuracy": sum(every_rev) / len(every_rev) if every_rev else None,
        "revision_per_category": {k: sum(v) / len(v) for k, v in revisions.items()},
        "latency": _latency(times),
        "llm_calls": calls,
        "latency_with_llm": _latency(llm_times),
        "loadavg_1min": [load_start, os.getloadavg()[0]],
        "misses": misses,
    }


CRITICS = {"llm": LLMCritic, "evidence-first": EvidenceFirstCritic}
"""How the critic suite asks each chat model: the whole verdict, or only what is left after a
failure the trace shows (lwm's default)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="grammar,local,local:qwen2.5-coder-0.5b",
                    help="comma-separated: grammar and/or get_chat_model specs")
    ap.add_argument("--kinds", default="grammar,paraphrase,ungroundable",
                    help="parse-suite kinds to run the chat models on (grammar runs all)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many items per kind")
    ap.add_argument("--no-critic", action="store_true", help="skip the critic suite")
    ap.add_argument("--wire", default="text",
                    help="comma-separated answer formats to parse in: text and/or fields")
    ap.add_argument("--parsers", default="llm,grammar-first",
                    help=f"comma-separated, how to ask each chat model: {', '.join(PARSERS)}")
    ap.add_argument("--critics", default="llm,evidence-first",
                    help=f"comma-separated, how to ask each chat model to judge: "
                    f"{', '.join(CRITICS)}")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args()

    parse_items = load_suite("parse_suite.yaml")
    critic_items = load_suite("critic_suite.yaml")
    kinds = args.kinds.split(",")

    def pick(items: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
        if not args.limit:
            return items
        seen: dict[str, int] = {}
        out = []
        for item in items:
            seen[item[key]] = seen.get(item[key], 0) + 1
            if seen[item[key]] <= args.limit:
                out.append(item)
        return out

    report: dict[str, Any] = {"machine": machine_info(), "seed": SEED, "threads": args.threads,
                              "suites": {"parse": len(parse_items), "critic": len(critic_items)},
                              "results": {}}
    for name in args.models.split(","):
        print(f"== {name}", file=sys.stderr)
        if name == "grammar":
            report["results"][name] = {"parse": run_parse(parse_babyai_mission, parse_items)}
        else:
            llm = get_chat_model(name, n_threads=args.threads, seed=SEED)
            llm_calls = _LLMCalls()
            llm.callbacks = [*(llm.callbacks or []), llm_calls]
            start = time.perf_counter()
            llm.invoke("Say OK.", max_tokens=2)
            result = {"load_and_first_call_s": time.perf_counter() - start, "parse": {}}
            items = pick([i for i in parse_items if i["kind"] in kinds], "kind")
            for wire in args.wire.split(","):
                start = time.perf_counter()
                LLMGoalParser(llm, wire=wire).parse("walk to the door")  # caches the prompt
                result[f"prompt_prefill_s_{wire}"] = time.perf_counter() - start
                result["parse"][wire] = {}
                for how in args.parsers.split(","):
                    clear_parse_cache()
                    parser = PARSERS[how](llm, wire=wire)
                    print(f"-- {name} wire={wire} parser={how}", file=sys.stderr)
                    parsed = run_parse(parser.parse, items, llm_calls)
                    if isinstance(parser, GrammarFirstParser):
                        parsed["answered_by"] = dict(parser.answered_by)
                    result["parse"][wire][how] = parsed
            if not args.no_critic:
                result["critic"] = {}
                for how in args.critics.split(","):
                    print(f"-- {name} critic={how}", file=sys.stderr)
                    result["critic"][how] = run_critic(CRITICS[how](llm),
                                                       pick(critic_items, "category"), llm_calls)
            report["results"][name] = result
        if args.json:
            write_json(args.json, report)
    for name, result in report["results"].items():
        runs = ({("-", "-"): result["parse"]} if name == "grammar" else
                {(wire, how): parse for wire, by_how in result["parse"].items()
                 for how, parse in by_how.items()})
        for (wire, how), parse in runs.items():
            line = f"{name:28s} {wire:6s} {how:13s} parse " + " ".join(
                f"{k} {v:.0%} ({parse['counts'][k]})" for k, v in parse["accuracy"].items())
            line += f"  median {parse['latency'].get('median_s', 0):.2f}s/call"
            if "llm_calls" in parse:
                line += (f"; {sum(parse['llm_calls'].values())} LLM calls, median "
                         f"{parse['latency_with_llm'].get('median_s', 0):.2f}s on items with one")
            print(line)
        for how, crit in result.get("critic", {}).items():
            rev = crit["revision_accuracy"]
            print(f"{name:28s} critic {how:14s} verdicts {crit['accuracy']:.0%}, revisions "
                  f"{'-' if rev is None else format(rev, '.0%')}; median "
                  f"{crit['latency']['median_s']:.2f}s per trace; {crit['llm_calls']} LLM calls, "
                  f"median {crit['latency_with_llm'].get('median_s', 0):.2f}s on traces with one")


if __name__ == "__main__":
    main()
