"""Evaluation: run task suites with lwm and baselines, locally or on Ray, and write reports.

    lwm eval --suite babyai-goto --agents lwm,bot,random --episodes 200 --out reports/goto

- `collect`: the `Collector` interface (the same map over episodes in-process or on a Ray
  cluster, identical results for the same seeds);
- `episodes`: `episodes_for` (the evaluation episodes every agent gets: seed, instruction,
  split, kind), `EpisodeOutcome`, and the `Referee` that judges every agent by minigrid's own
  verifier of the mission;
- `runners`: the agents as picklable runner factories (`make_runner("bot")`, ...: random, bot,
  lwm, lwm-grammar, lwm-no-critic, llm-only);
- `journal`: `EpisodeJournal` (each finished episode on disk at once) and `run_agents`, which
  resumes an interrupted evaluation from it;
- `report`: `summarize` (success with 95 % Wilson intervals, by split, kind and family),
  `paired` (agents compared on the episodes both played, with McNemar's exact test) and
  `write_report` (summary.md, report.json, PNG plots).

Names load on first use, so `import lwm.eval` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Collector": "collect", "LocalCollector": "collect", "make_collector": "collect",
    "EpisodeOutcome": "episodes", "EvalEpisode": "episodes", "Referee": "episodes",
    "episodes_for": "episodes",
    "EpisodeJournal": "journal", "run_agents": "journal",
    "RUNNERS": "runners", "make_runner": "runners", "register_runner": "runners",
    "mcnemar_p": "report", "paired": "report", "summarize": "report", "wilson": "report",
    "write_report": "report",
}

__all__ = [
    "RUNNERS",
    "Collector",
    "EpisodeJournal",
    "EpisodeOutcome",
    "EvalEpisode",
    "LocalCollector",
    "Referee",
    "episodes_for",
    "make_collector",
    "make_runner",
    "mcnemar_p",
    "paired",
    "register_runner",
    "run_agents",
    "summarize",
    "wilson",
    "write_report",
]

if TYPE_CHECKING:
    from lwm.eval.collect import Collector, LocalCollector, make_collector
    from lwm.eval.episodes import EpisodeOutcome, EvalEpisode, Referee, episodes_for
    from lwm.eval.journal import EpisodeJournal, run_agents
    from lwm.eval.report import mcnemar_p, paired, summarize, wilson, write_report
    from lwm.eval.runners import RUNNERS, make_runner, register_runner


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lwm.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lwm.eval.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
