"""The journal of an evaluation: each finished episode appended to a JSON-lines file the moment
it finishes, so an interrupted `lwm eval` (a kill, Ctrl-C, a machine that went away) loses only
the episodes in progress, and the same command resumes where it stopped.

    journal = EpisodeJournal("reports/goto/episodes.jsonl")
    outcomes = run_agents({"bot": make_runner("bot")}, episodes, collector, journal)

An entry is reused for an episode only when the runner's settings are equal (`runner_key`: every
field of the runner, the contents of the checkpoint files it names, lwm's version, and for
runners that plan the planners' default settings) and the
episode is equal (suite, seed, instruction, step limit, ...). Anything else runs again, so a
journal can never hand one agent's or one model's results to another; more episodes of the same
run (`--episodes 200` after `--episodes 50`) reuse the first ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from lwm.eval.collect import Collector
from lwm.eval.episodes import EpisodeOutcome, EvalEpisode

__all__ = ["JOURNAL_NAME", "EpisodeJournal", "JournalError", "run_agents", "runner_key"]

JOURNAL_NAME = "episodes.jsonl"
"""The journal's file name in a report directory."""
FORMAT = 1
_HASHED = (".safetensors", ".json")
"""Files of a named checkpoint whose contents enter `runner_key`."""


class JournalError(ValueError):
    """A journal file that is not one, or is damaged before its last line."""


def _files_digest(path: Path) -> str:
    """sha256 over the names and contents of the weight and config files at `path` (a file, or
    a directory and its subdirectories)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in _HASHED)
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def runner_key(runner: Any) -> str:
    """A string that is equal for two runners exactly when they would play an episode alike:
    lwm's version, the runner's class, its fields (a dataclass's; else its repr), the contents
    of every existing file or directory a string field names (checkpoints), and what a runner's
    `defaults()` returns (the library defaults its settings fall back on), so that a new
    default (the search planners' terminal, say) plays the episodes again."""
    from lwm import __version__

    if is_dataclass(runner):
        settings: dict[str, Any] = {}
        for f in fields(runner):
            value = getattr(runner, f.name)
            settings[f.name] = value
            if isinstance(value, str) and value and Path(value).exists():
                settings[f"{f.name}.sha256"] = _files_digest(Path(value))
        defaults = getattr(runner, "defaults", None)
        if callable(defaults):
            settings["defaults"] = defaults()
    else:
        settings = {"repr": repr(runner)}
    kind = f"{type(runner).__module__}.{type(runner).__qualname__}"
    return json.dumps({"lwm": __version__, "runner": kind, "settings": settings},
                      sort_keys=True, default=repr)


def _episode_key(episode: EvalEpisode) -> str:
    return json.dumps(asdict(episode), sort_keys=True)


class EpisodeJournal:
    """Finished episodes on disk, by (runner key, episode).

    Each `record` appends one line and flushes it to disk. A last line cut short by a kill is
    ignored (its episode runs again) and cut off before the next record; a damaged line before
    it raises `JournalError`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._done: dict[tuple[str, str], EpisodeOutcome] = {}
        self._keep: int | None = None  # bytes to keep before the next record: drops a torn line
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise JournalError(f"cannot read the journal {self.path}: {exc}") from exc
        lines = data.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, start=1):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            if number == len(lines):  # no newline after it: killed while writing it
                self._keep = start  # its episode runs again
                break
            try:
                entry = json.loads(line.decode("utf-8"))
                if not isinstance(entry, dict) or entry.get("lwm_journal") != FORMAT:
                    raise ValueError(f"not a format-{FORMAT} journal entry")
                outcome = EpisodeOutcome.from_dict(entry["outcome"])
                key = (entry["runner"], _episode_key(outcome.episode))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise JournalError(
                    f"{self.path} line {number} is not an lwm evaluation journal entry ({exc}); "
                    "move the file away, or pass --fresh to start the evaluation over"
                ) from exc
            self._done[key] = outcome

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: str, episode: EvalEpisode) -> EpisodeOutcome | None:
        """The recorded outcome of `episode` under runner key `key`, or None."""
        return self._done.get((key, _episode_key(episode)))

    def record(self, key: str, outcome: EpisodeOutcome) -> None:
        """Append `outcome` under runner key `key`, on disk before this returns."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"lwm_journal": FORMAT, "runner": key, "outcome": outcome.to_dict()})
        if self._keep is not None:
            with self.path.open("r+b") as f:
                f.truncate(self._keep)
            self._keep = None
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._done[(key, _episode_key(outcome.episode))] = outcome


def run_agents(
    runners: Mapping[str, Any],
    items: Sequence[EvalEpisode],
    collector: Collector,
    journal: EpisodeJournal | None = None,
    progress: bool = True,
) -> tuple[list[EpisodeOutcome], dict[str, int]]:
    """Every runner on every episode, agent after agent; with a `journal`, the episodes it
    already holds are taken from it and each new one is recorded as it finishes.

    Returns the outcomes (agent by agent, each in episode order) and, per agent, how many came
    from the journal.
    """
    outcomes: list[EpisodeOutcome] = []
    reused: dict[str, int] = {}
    for name, runner in runners.items():
        key = runner_key(runner) if journal is not None else ""
        known = [journal.get(key, e) if journal is not None else None for e in items]
        todo = [i for i, o in enumerate(known) if o is None]
        reused[name] = len(items) - len(todo)

        def save(index: int, result: Any, key: str = key) -> None:
            journal.record(key, _outcome(result))

        fresh = [] if not todo else collector.map(  # nothing to play: no worker to build
            runner, [items[i] for i in todo], progress=name if progress else None,
            on_result=None if journal is None else save)
        for i, result in zip(todo, fresh, strict=True):
            known[i] = _outcome(result)
        outcomes += known
    return outcomes, reused


def _outcome(result: Any) -> EpisodeOutcome:
    return result if isinstance(result, EpisodeOutcome) else EpisodeOutcome.from_dict(result)
