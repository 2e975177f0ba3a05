"""Episode storage on disk and fixed-length sequence sampling for world-model training.

`EpisodeRecorder` turns env steps into an `Episode`; `EpisodeStore` writes episodes crash-safely,
one `.npz` file each (format in `lwm/data/storage.py` and `FORMAT.md`); `SequenceSampler` draws
`SequenceBatch`es of fixed-length windows from them.
"""

from lwm.data.episodes import Episode, EpisodeRecorder
from lwm.data.sampler import SequenceBatch, SequenceSampler
from lwm.data.storage import (
    FORMAT_VERSION,
    EpisodeFormatError,
    EpisodeStore,
    load_episode,
    save_episode,
)

__all__ = [
    "FORMAT_VERSION",
    "Episode",
    "EpisodeFormatError",
    "EpisodeRecorder",
    "EpisodeStore",
    "SequenceBatch",
    "SequenceSampler",
    "load_episode",
    "save_episode",
]
