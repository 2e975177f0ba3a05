"""Evaluation reports: success rates with 95 % Wilson intervals, broken down, as markdown, JSON
and PNG plots.

    summary = summarize(outcomes)                    # agent -> every figure
    write_report("reports/goto", summary, outcomes, meta={"suite": "babyai-goto"})

Breakdowns per agent: trained vs held-out (colour, type) combinations, grammar missions vs
paraphrases, and instruction family. A group with no episodes has rate and interval None.
Agents that played the same episodes are also compared episode by episode (`paired`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lwm.eval.episodes import EpisodeOutcome

__all__ = ["load_outcomes", "mcnemar_p", "paired", "summarize", "wilson", "write_report"]

BREAKDOWNS = {"by_split": ("split", ("train", "held_out")),
              "by_kind": ("kind", ("grammar", "paraphrase"))}
"""Summary key -> (EvalEpisode field, its values in display order)."""


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (nan, nan when n is 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)  # rounding can step outside


def _rate(outcomes: Sequence[EpisodeOutcome]) -> dict[str, Any]:
    n, k = len(outcomes), sum(o.success for o in outcomes)
    if n == 0:
        return {"n": 0, "successes": 0, "success": None, "ci95": None}
    return {"n": n, "successes": k, "success": k / n, "ci95": list(wilson(k, n))}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _gap(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Success of group a minus group b (None when either is empty)."""
    if a["success"] is None or b["success"] is None:
        return None
    return a["success"] - b["success"]


def summarize(outcomes: Sequence[EpisodeOutcome]) -> dict[str, dict[str, Any]]:
    """Per agent (in order of first appearance): n, success with its 95 % interval, mean steps
    (all episodes, and successful ones), success by split, by instruction kind, by both
    ("held_out/grammar", ...) and by family (each with n and interval), the mean of the
    families' rates (each family weighted equally, as BALROG averages its tasks), the gaps trained -
    held-out and grammar - paraphrase, LLM calls, wall seconds and invalid actions per episode,
    mean planning ms per action, errors."""
    agents: dict[str, list[EpisodeOutcome]] = {}
    for o in outcomes:
        agents.setdefault(o.agent, []).append(o)
    summary = {}
    for agent, mine in agents.items():
        row: dict[str, Any] = _rate(mine)
        row["mean_steps"] = _mean([o.steps for o in mine])
        row["mean_steps_success"] = _mean([o.steps for o in mine if o.success])
        for key, (attr, values) in BREAKDOWNS.items():
            row[key] = {v: _rate([o for o in mine if getattr(o.episode, attr) == v])
                        for v in values}
        row["by_split_and_kind"] = {
            f"{split}/{kind}": _rate([o for o in mine if o.episode.split == split
                                      and o.episode.kind == kind])
            for split in BREAKDOWNS["by_split"][1] for kind in BREAKDOWNS["by_kind"][1]}
        families = sorted({o.episode.family for o in mine if o.episode.family is not None})
        row["by_family"] = {f: _rate([o for o in mine if o.episode.family == f])
                            for f in families}
        row["family_mean"] = _mean([r["success"] for r in row["by_family"].values()])
        row["gap_train_minus_held_out"] = _gap(row["by_split"]["train"],
                                               row["by_split"]["held_out"])
        row["gap_grammar_minus_paraphrase"] = _gap(row["by_kind"]["grammar"],
                                                   row["by_kind"]["paraphrase"])
        row["llm_calls_per_episode"] = _mean([o.llm_calls for o in mine])
        row["wall_s_per_episode"] = _mean([o.wall_s for o in mine])
        row["plan_ms_per_action"] = _mean([o.plan_ms_per_action for o in mine
                                           if o.plan_ms_per_action is not None])
        row["invalid_actions_per_episode"] = _mean([o.invalid_actions for o in mine])
        row["errors"] = sum(o.error is not None for o in mine)
        summary[agent] = row
    return summary


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: the chance, were both agents equally good, of episodes
    splitting at least this unevenly between "only A succeeded" and "only B succeeded"."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired(outcomes: Sequence[EpisodeOutcome]) -> list[dict[str, Any]]:
    """Every pair of agents (in order of first appearance) over the episodes both played: n,
    both / only_a / only_b / neither succeeded, the success difference a - b on those episodes
    and its exact McNemar p-value. Pairs with no common episode are left out."""
    by_agent: dict[str, dict[str, bool]] = {}
    for o in outcomes:
        key = json.dumps(dataclasses.asdict(o.episode), sort_keys=True)
        by_agent.setdefault(o.agent, {})[key] = o.success
    names, rows = list(by_agent), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = by_agent[a].keys() & by_agent[b].keys()
            if not common:
                continue
            pairs = [(by_agent[a][k], by_agent[b][k]) for k in common]
            only_a = sum(x and not y for x, y in pairs)
            only_b = sum(y and not x for x, y in pairs)
            rows.append({
                "a": a, "b": b, "n": len(pairs), "both": sum(x and y for x, y in pairs),
                "only_a": only_a, "only_b": only_b,
                "neither": sum(not x and not y for x, y in pairs),
                "difference": (only_a - only_b) / len(pairs),
                "mcnemar_p": mcnemar_p(only_a, only_b),
            })
    return rows


# ---------------------------------------------------------------------- writing


def _pct(rate: dict[str, Any]) -> str:
    if rate["success"] is None:
        return "-"
    lo, hi = rate["ci95"]
    return f"{100 * rate['success']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] (n={rate['n']})"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _markdown(summary: dict[str, dict[str, Any]], meta: dict[str, Any],
              pairs: Sequence[dict[str, Any]] = ()) -> str:
    lines = [f"# lwm eval: {meta.get('suite', '?')}", ""]
    for key, value in meta.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
        lines.append(f"- {key}: {shown}")
    lines += ["", "Success in %, with the 95 % Wilson interval and the number of episodes.", "",
              "| agent | success | trained combos | held-out combos | grammar | paraphrase | "
              "mean steps | LLM calls/ep | wall s/ep | plan ms/action | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for agent, row in summary.items():
        lines.append(
            f"| {agent} | {_pct(row)} | {_pct(row['by_split']['train'])} | "
            f"{_pct(row['by_split']['held_out'])} | {_pct(row['by_kind']['grammar'])} | "
            f"{_pct(row['by_kind']['paraphrase'])} | {_num(row['mean_steps'], '.1f')} | "
            f"{_num(row['llm_calls_per_episode'], '.1f')} | "
            f"{_num(row['wall_s_per_episode'], '.2f')} | "
            f"{_num(row['plan_ms_per_action'], '.0f')} | {row['errors']} |")
    cells = list(next(iter(summary.values()))["by_split_and_kind"]) if summary else []
    lines += ["", "## Split by instruction kind", "",
              "| agent | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
    for agent, row in summary.items():
        lines.append(f"| {agent} | "
                     + " | ".join(_pct(row["by_split_and_kind"][c]) for c in cells) + " |")
    families = sorted({f for row in summary.values() for f in row["by_family"]})
    if len(families) > 1:
        lines += ["", "## By instruction family", "",
                  "Family mean: the families' rates averaged with equal weight (BALROG's "
                  "average over its tasks).", "",
                  "| agent | family mean | " + " | ".join(families) + " |",
                  "|---|---|" + "---|" * len(families)]
        for agent, row in summary.items():
            cells = [_pct(row["by_family"][f]) if f in row["by_family"] else "-"
                     for f in families]
            mean = _num(None if row["family_mean"] is None else 100 * row["family_mean"], ".1f")
            lines.append(f"| {agent} | {mean} | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", "## Agent against agent, on the same episodes", "",
                  "Episodes both agents played; p: exact McNemar test on the episodes only one "
                  "of them succeeded in.", "",
                  "| A | B | episodes | both | only A | only B | neither | A - B | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in pairs:
            lines.append(f"| {r['a']} | {r['b']} | {r['n']} | {r['both']} | {r['only_a']} | "
                         f"{r['only_b']} | {r['neither']} | {100 * r['difference']:+.1f} | "
                         f"{r['mcnemar_p']:.2g} |")
    lines += ["", "![success by agent](success.png)", "", "![breakdowns](breakdown.png)", ""]
    return "\n".join(lines)


def _bars(ax, labels: list[str], rates: list[dict[str, Any]], offset: float = 0.0,
          width: float = 0.8, label: str | None = None) -> None:
    """Bars of success rates with their 95 % intervals as error bars (empty groups left out)."""
    x = np.arange(len(labels)) + offset
    values = np.array([np.nan if r["success"] is None else r["success"] for r in rates])
    lo = np.array([np.nan if r["ci95"] is None else r["ci95"][0] for r in rates])
    hi = np.array([np.nan if r["ci95"] is None else r["ci95"][1] for r in rates])
    errors = np.clip(np.nan_to_num(np.stack([values - lo, hi - values])), 0.0, None)
    ax.bar(x, np.nan_to_num(values), width, yerr=errors, capsize=3, label=label)


def _plot(summary: dict[str, dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    agents = list(summary)
    fig = Figure(figsize=(max(4.0, 1.2 * len(agents) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    _bars(ax, agents, [summary[a] for a in agents])
    ax.set_xticks(range(len(agents)), agents)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success (95 % CI)")
    ax.set_title(title)
    success = out_dir / "success.png"
    fig.savefig(success, dpi=120)

    panels = [("by_split", "trained vs held-out combinations"),
              ("by_kind", "grammar missions vs paraphrases")]
    if any(len(row["by_family"]) > 1 for row in summary.values()):
        panels.append(("by_family", "instruction family"))
    fig = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
    for i, (key, panel_title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        groups = list(dict.fromkeys(g for row in summary.values() for g in row[key]))
        width = 0.8 / max(len(agents), 1)
        for j, agent in enumerate(agents):
            empty = {"success": None, "ci95": None}
            rates = [summary[agent][key].get(g, empty) for g in groups]
            _bars(ax, groups, rates, offset=(j - (len(agents) - 1) / 2) * width, width=width,
                  label=agent)
        ax.set_xticks(range(len(groups)), groups, rotation=20 if key == "by_family" else 0)
        ax.set_ylim(0, 1.05)
        ax.set_title(panel_title)
        ax.legend(fontsize="small")
    breakdown = out_dir / "breakdown.png"
    fig.savefig(breakdown, dpi=120)
    return [success, breakdown]


def write_report(out_dir: str | Path, summary: dict[str, dict[str, Any]],
                 outcomes: Sequence[EpisodeOutcome], meta: dict[str, Any]) -> dict[str, Path]:
    """Write `summary.md` (tables), `report.json` (meta, the machine, every figure, the agents
    compared episode by episode, every episode) and the plots `success.png` and `breakdown.png`
    into `out_dir`; returns the paths by name."""
    from lwm.report import machine_info, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out_dir / "summary.md", "json": out_dir / "report.json"}
    pairs = paired(outcomes)
    paths["summary"].write_text(_markdown(summary, meta, pairs), encoding="utf-8")
    write_json(paths["json"], {"meta": meta, "machine": machine_info(), "summary": summary,
                               "paired": pairs, "episodes": [o.to_dict() for o in outcomes]})
    title = f"{meta.get('suite', '')}: success by agent"
    paths["success_png"], paths["breakdown_png"] = _plot(summary, out_dir, title)
    return paths


def load_outcomes(path: str | Path) -> list[EpisodeOutcome]:
    """The episodes of a `report.json` (a report directory or the file itself)."""
    path = Path(path)
    path = path / "report.json" if path.is_dir() else path
    data = json.loads(path.read_text(encoding="utf-8"))
    return [EpisodeOutcome.from_dict(d) for d in data["episodes"]]
