"""GoalEncoder with the real packaged all-MiniLM-L6-v2 (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lwm.goals import all_concrete_goals
from lwm.language import EMBED_DIM, GoalEncoder, GoalSpec


@pytest.fixture(scope="module")
def encoder() -> GoalEncoder:
    return GoalEncoder()


def test_shapes_dtype_and_norm(encoder):
    texts = [g.text for g in all_concrete_goals()]
    vectors = encoder.encode(texts)
    assert vectors.shape == (len(texts), EMBED_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.encode("go to the red ball").shape == (EMBED_DIM,)
    assert encoder.encode([]).shape == (0, EMBED_DIM)
    assert len(np.unique(vectors.round(5), axis=0)) == len(texts)


def test_cached_and_batched_results_agree(encoder):
    alone = encoder.encode("pick up the blue key").copy()
    fresh = GoalEncoder(batch_size=2).encode(["open the grey door", "pick up the blue key"])
    np.testing.assert_allclose(fresh[1], alone, atol=1e-5)
    assert encoder.encode(["pick up the blue key"] * 3).shape == (3, EMBED_DIM)


def test_spec_and_torch(encoder):
    spec = GoalSpec.from_texts(["go to the red ball", "open the blue door"])
    out = encoder.encode(spec, as_torch=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), encoder.encode(spec.texts), atol=1e-6)


def test_similar_goals_are_closer(encoder):
    a, b, c = encoder.encode(["go to the red ball", "go to the red box", "open the blue door"])
    assert a @ b > a @ c
