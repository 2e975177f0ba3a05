"""A writer process for the crash-safety test: appends synthetic episodes until it is killed.

    python tests/episode_writer.py STORE_DIR STEPS

Prints each appended index on its own line as soon as the episode is durable.
`synthetic_episode` is also imported by tests/test_data.py to check what landed.
"""

from __future__ import annotations

import sys

import numpy as np

from lwm.data import Episode, EpisodeStore


def synthetic_episode(seed: int, steps: int) -> Episode:
    """A deterministic random episode of `steps` steps with a BabyAI-shaped 7×7×3 view."""
    rng = np.random.default_rng(seed)
    achieved: list[list[str]] = [[] for _ in range(steps + 1)]
    achieved[steps] = ["go to the red ball", "put the red ball next to the blue key"]
    achieved_locs: list[list[list[list[str]]]] = [[] for _ in range(steps + 1)]
    achieved_locs[steps] = [[["left"], []], [["left"], ["front", "right"]]]
    return Episode(
        image=rng.integers(0, 11, size=(steps + 1, 7, 7, 3), dtype=np.uint8),
        direction=rng.integers(0, 4, size=steps + 1),
        carrying=rng.integers(0, 6, size=(steps + 1, 2)),
        action=rng.integers(0, 7, size=steps),
        reward=rng.random(steps, dtype=np.float32),
        terminated=bool(seed % 2),
        truncated=not seed % 2,
        events=[[f"step {t} of episode {seed}"] for t in range(steps + 1)],
        achieved=achieved,
        achieved_locs=achieved_locs,
        mission="go to the red ball",
        meta={"env_id": "synthetic", "seed": seed},
    )


def main() -> None:
    path, steps = sys.argv[1], int(sys.argv[2])
    store = EpisodeStore(path)
    while True:
        index = store.append(synthetic_episode(len(store), steps))
        print(index, flush=True)


if __name__ == "__main__":
    main()
