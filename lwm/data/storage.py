"""Episodes on disk: one `.npz` file per episode, written so that a crash cannot corrupt them.

Format (version 1; also in `lwm/data/FORMAT.md`)
------------------------------------------------
A store is a directory. Each finished episode is one file named by its zero-padded index,
`00000000.npz`, `00000001.npz`, ... (eight digits, more past 99,999,999). Each file is a
`numpy.savez_compressed` archive that loads with `allow_pickle=False`, holding exactly these keys
(T = number of steps):

    format_version  ()            int64    1
    image           (T+1,H,W,C)   uint8    symbolic view; 7×7×3 for BabyAI
    direction       (T+1,)        int64
    carrying        (T+1, 2)      int64    (object type index, colour index); (1, 0) = nothing
    action          (T,)          int64
    reward          (T,)          float32
    terminated      ()            bool     of the last step
    truncated       ()            bool     of the last step
    mission         ()            unicode
    events          ()            unicode  JSON: T+1 lists of str, index 0 = at reset
    achieved        ()            unicode  JSON: T+1 lists of str, index 0 = at reset
    achieved_locs   ()            unicode  JSON: T+1 lists, per achieved goal [[str], [str]]
    meta            ()            unicode  JSON object: env_id, seed, suite, ...

Crash safety: an episode is written to a hidden temporary file in the same directory
(`.00000007.npz.<pid>.tmp`), flushed and fsync'd, renamed onto its final name with `os.replace`
(atomic on POSIX), and then the directory is fsync'd so the rename itself survives a power cut.
A file under a final name is therefore always complete; a crash loses at most the episode being
written, whose temporary file readers ignore and the next writer deletes.

One writer at a time: a writing store holds an exclusive `flock` on `<dir>/.lock` (released by the
kernel if the process dies), which is what makes it safe for the writer to delete stale temporary
files and to number new episodes after the existing ones. Any number of readers may open the
directory while it is being written; `refresh()` picks up episodes that landed since.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

import numpy as np

from lwm.data.episodes import Episode

__all__ = ["FORMAT_VERSION", "EpisodeFormatError", "EpisodeStore", "load_episode", "save_episode"]

FORMAT_VERSION = 1
"""Version of the on-disk episode format this code writes and reads."""

_KEYS = frozenset({
    "format_version", "image", "direction", "carrying", "action", "reward", "terminated",
    "truncated", "mission", "events", "achieved", "achieved_locs", "meta",
})
_FINAL_NAME = re.compile(r"^(\d{8,})\.npz$")
_TEMP_NAME = re.compile(r"^\.\d{8,}\.npz\.\d+\.tmp$")
# What a damaged or foreign file can raise from inside numpy / zipfile / json.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


class EpisodeFormatError(ValueError):
    """A stored episode file is corrupt, foreign, or of an unknown format version."""


def _episode_name(index: int) -> str:
    return f"{index:08d}.npz"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_episode(episode: Episode, path: str | os.PathLike[str]) -> None:
    """Write `episode` to `path` atomically: temp file, fsync, `os.replace`, fsync the directory.

    Overwrites an existing file at `path`; `EpisodeStore.append` is the way to add new episodes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arrays = {
        "format_version": np.int64(FORMAT_VERSION),
        "image": episode.image,
        "direction": episode.direction,
        "carrying": episode.carrying,
        "action": episode.action,
        "reward": episode.reward,
        "terminated": np.bool_(episode.terminated),
        "truncated": np.bool_(episode.truncated),
        # Unicode arrays rather than object arrays, so loading never needs pickle.
        "mission": np.str_(episode.mission),
        "events": np.str_(json.dumps(episode.events)),
        "achieved": np.str_(json.dumps(episode.achieved)),
        "achieved_locs": np.str_(json.dumps(episode.achieved_locs)),
        "meta": np.str_(json.dumps(episode.meta)),
    }
    try:
        # A file object, not a name: np.savez would append ".npz" to the temporary name.
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _scalar(archive: np.lib.npyio.NpzFile, key: str, kind: str) -> np.generic:
    value = archive[key]
    if value.shape != () or value.dtype.kind != kind:
        raise ValueError(f"{key}: expected a scalar of kind {kind!r}, got {value.dtype} "
                         f"with shape {value.shape}")
    return value[()]


def load_episode(path: str | os.PathLike[str]) -> Episode:
    """Read one episode file; raise `EpisodeFormatError` naming the file if it is not valid."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise EpisodeFormatError(f"{path}: not a readable episode file ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise EpisodeFormatError(f"{path}: a bare .npy array, not an lwm episode archive")
    with archive:
        keys = set(archive.files)
        if keys != _KEYS:
            missing, extra = sorted(_KEYS - keys), sorted(keys - _KEYS)
            raise EpisodeFormatError(
                f"{path}: not an lwm episode file (missing keys {missing}, unexpected keys {extra})"
            )
        try:
            version = int(_scalar(archive, "format_version", "i"))
            if version != FORMAT_VERSION:
                raise EpisodeFormatError(
                    f"{path}: episode format version {version}; this lwm reads version "
                    f"{FORMAT_VERSION}"
                )
            return Episode(
                image=archive["image"],
                direction=archive["direction"],
                carrying=archive["carrying"],
                action=archive["action"],
                reward=archive["reward"],
                terminated=bool(_scalar(archive, "terminated", "b")),
                truncated=bool(_scalar(archive, "truncated", "b")),
                mission=str(_scalar(archive, "mission", "U")),
                events=json.loads(str(_scalar(archive, "events", "U"))),
                achieved=json.loads(str(_scalar(archive, "achieved", "U"))),
                achieved_locs=json.loads(str(_scalar(archive, "achieved_locs", "U"))),
                meta=json.loads(str(_scalar(archive, "meta", "U"))),
            )
        except EpisodeFormatError:
            raise
        except _READ_ERRORS as exc:
            raise EpisodeFormatError(f"{path}: corrupt or invalid episode file ({exc})") from exc


class EpisodeStore:
    """A directory of episode files, indexed 0, 1, 2, ... in the order they were appended.

    `mode="a"` (default) creates the directory if needed, takes the writer lock, deletes temporary
    files left by a crashed writer, and numbers new episodes after the highest existing index.
    `mode="r"` only reads and may run beside a writer; call `refresh()` to see new episodes.

    `store[i]` and iteration go by position in index order, which equals the file index unless
    files were removed by hand (`indices` lists the file indices). Episodes are read from disk on
    every access; `SequenceSampler` keeps the ones it trains on in memory.
    """

    def __init__(self, path: str | os.PathLike[str], mode: Literal["r", "a"] = "a") -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._lock: IO[bytes] | None = None
        if mode == "a":
            self.path.mkdir(parents=True, exist_ok=True)
            # A file object, so the lock is released even if the store is dropped without close().
            self._lock = open(self.path / ".lock", "ab")  # noqa: SIM115 (held until close)
            try:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                self._lock = None
                raise RuntimeError(
                    f"{self.path}: another process is writing to this episode store"
                ) from None
            for entry in self.path.iterdir():
                if _TEMP_NAME.match(entry.name):
                    entry.unlink()
        elif not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such episode store directory")
        self._indices: list[int] = []
        self.refresh()

    def refresh(self) -> int:
        """Rescan the directory for episodes written since; return how many appeared."""
        found = sorted(
            int(m.group(1)) for e in os.scandir(self.path) if (m := _FINAL_NAME.match(e.name))
        )
        new = len(found) - len(self._indices)
        self._indices = found
        return new

    @property
    def indices(self) -> tuple[int, ...]:
        """File indices of the stored episodes, ascending."""
        return tuple(self._indices)

    def file(self, index: int) -> Path:
        """Path of the file holding episode `index` (whether or not it exists yet)."""
        return self.path / _episode_name(index)

    def append(self, episode: Episode) -> int:
        """Write `episode` durably under the next free index and return that index."""
        if self._lock is None:
            raise RuntimeError(f"{self.path}: store is not open for writing (mode={self.mode!r})")
        index = self._indices[-1] + 1 if self._indices else 0
        save_episode(episode, self.file(index))
        self._indices.append(index)
        return index

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, position: int) -> Episode:
        return load_episode(self.file(self._indices[position]))

    def __iter__(self) -> Iterator[Episode]:
        for index in list(self._indices):
            yield load_episode(self.file(index))

    def close(self) -> None:
        """Release the writer lock; the store stays readable."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EpisodeStore({str(self.path)!r}, mode={self.mode!r}, episodes={len(self)})"
