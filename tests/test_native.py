"""The native CPU kernels (`lwm.models.native`) against the pure-PyTorch paths they replace.

The kernels must build wherever the tests run (CI has a compiler): a build failure fails here
instead of silently leaving imagination on the slower path.
"""

import pytest
import torch

from lwm.models import native
from lwm.models.ssm import Mamba2, Mamba2Branches
from lwm.models.world_model import CELL_IDS, WorldModel, preset

D_MODEL = 32

pytestmark = pytest.mark.skipif(not native.ENABLED, reason="LWM_NATIVE=0 turned the kernels off")


@pytest.fixture
def reference():
    """Run a call with the kernels off (the pure-PyTorch reference), then back on."""
    def off(fn, *args):
        with native.switched(False):
            return fn(*args)
    return off


def test_the_kernels_build():
    assert native.kernels() is not None, "the native kernels failed to build (see the warning)"


def test_disabled_kernels_are_not_used(monkeypatch):
    monkeypatch.setattr(native, "ENABLED", False)
    assert native.kernels() is None


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken(verbose=False):
        raise OSError("no compiler here")

    monkeypatch.setattr(native, "build", broken)
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert native.kernels() is None
    assert native.kernels() is None  # not tried again


def make_block() -> Mamba2:
    torch.manual_seed(0)
    block = Mamba2(D_MODEL, d_state=8, headdim=16).eval()
    with torch.no_grad():  # away from the initial values, where some terms vanish
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("roots", [1, 3, 12])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_branch_step_equals_the_reference(reference, roots, rows):
    # Several tokens on gathered branches (each ring slot, paths with and without room): the
    # same outputs, conv rings and paths as the PyTorch step.
    block = make_block()
    with torch.no_grad():
        _, state = block(torch.randn(roots, 5, D_MODEL))
        ours = Mamba2Branches.fork(state).take(torch.randint(0, roots, (rows,)))
        theirs = ours.clone()
        for step in range(5):
            x = torch.randn(rows, D_MODEL)
            y, ours = block.step_branches(ours, x)
            y_ref, theirs = reference(block.step_branches, theirs, x)
            torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(ours.conv, theirs.conv, atol=0, rtol=0)
            torch.testing.assert_close(ours.compact().path, theirs.compact().path,
                                       atol=2e-5, rtol=2e-5)
            assert ours.tokens == theirs.tokens == step + 1 and ours.t == theirs.t
            if step % 2:  # a gather leaves room for the next token
                pick = torch.randint(0, rows, (rows,))
                ours, theirs = ours.take(pick), theirs.take(pick)


def test_branch_step_rejects_a_root_it_does_not_have():
    block = make_block()
    with torch.no_grad():
        _, state = block(torch.randn(2, 5, D_MODEL))
        # enough rows that the bad one falls to a worker thread of the row loop
        branches = Mamba2Branches.fork(state).take(torch.randint(0, 2, (400,)))
        branches.origin[350] = 5
        with pytest.raises(RuntimeError, match="origin out of range"):
            block.step_branches(branches, torch.randn(400, D_MODEL))


def latent_inputs(decoder: str, goal_maps: int, rows: int = 50):
    torch.manual_seed(1)
    model = WorldModel(preset("debug", decoder=decoder, goal_maps=goal_maps)).eval()
    with torch.no_grad():
        for p in model.decoders.parameters():  # decisive argmaxes and gates
            p.mul_(3.0)
    h = torch.randn(rows, model.latent_dim)
    if decoder != "mlp":
        width = model.latent_dim - model.feature_dim
        h[:, model.feature_dim :] = torch.randint(0, CELL_IDS, (rows, width)).float()
    return model, h, torch.randint(0, model.cfg.n_actions, (rows,))


@pytest.mark.parametrize("decoder", ["mlp", "ego", "map"])
@pytest.mark.parametrize("goal_maps", [0, 4])
def test_predict_latent_equals_the_reference(reference, decoder, goal_maps):
    model, h, action = latent_inputs(decoder, goal_maps)
    with torch.no_grad():
        ours = model.predict_latent(h, action)
        theirs = reference(model.predict_latent, h, action)
        assert ours.shape == theirs.shape == (len(h), model.latent_dim if decoder != "map"
                                              else model.feature_dim + 49)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
        # one action for every row broadcasts as it does in PyTorch
        one = torch.tensor(3)
        torch.testing.assert_close(model.predict_latent(h, one),
                                   reference(model.predict_latent, h, one), atol=2e-5, rtol=2e-5)


def test_predict_latent_rejects_a_short_h_or_a_bad_id():
    model, h, action = latent_inputs("ego", 0, rows=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="need h of width"):
            model.predict_latent(h[:, :-1], action)
        h[2, model.feature_dim :] = CELL_IDS + 7  # every cell row 2 could copy from
        with pytest.raises(RuntimeError, match="cell id .* out of range"):
            model.predict_latent(h, action)


def test_backbone_stack_equals_the_reference(reference):
    # The whole Mamba-2 stack in one call: the same outputs and states as stepping its layers
    # one by one in PyTorch, through gathers and past the fold of long paths.
    from lwm.models.backbones import BackboneConfig, make_backbone
    from lwm.models.ssm import BRANCH_TOKENS

    torch.manual_seed(2)
    backbone = make_backbone("mamba2", BackboneConfig(d_model=D_MODEL, d_state=8, headdim=16,
                                                      n_layers=3)).eval()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.2 * torch.randn_like(p))
        _, state = backbone.prefill(torch.randn(2, 5, D_MODEL))
        ours = backbone.branch(state).take(torch.tensor([0, 1, 1, 0]))
        theirs = ours.clone()
        for step in range(BRANCH_TOKENS + 3):
            x = torch.randn(4, D_MODEL)
            y, ours = backbone.step(ours, x)
            y_ref, theirs = reference(backbone.step, theirs, x)
            torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
            if step % 3 == 1:
                pick = torch.randint(0, 4, (4,))
                ours, theirs = ours.take(pick), theirs.take(pick)
        for a, b in zip(ours.layers, theirs.layers, strict=True):
            assert a.tokens == b.tokens == 3 and a.t == b.t
            torch.testing.assert_close(a.materialize().ssm, b.materialize().ssm,
                                       atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(a.conv, b.conv, atol=1e-4, rtol=1e-4)


def test_map_step_equals_the_reference(reference):
    # The map decoder's map step: moved by each previous action (a forward move only where
    # the front cell was open), the new view written except unseen cells and the agent's own.
    model, _, _ = latent_inputs("map", 0)
    torch.manual_seed(3)
    rows = 64
    grid = torch.randint(0, CELL_IDS, (rows, model.map_moves.shape[-1]))
    grid[::3] = 0  # maps that have seen nothing
    front_open = torch.rand(rows) < 0.5
    prev_action = torch.randint(0, model.cfg.n_actions + 1, (rows,))  # START included
    z = torch.randn(rows, model.feature_dim + 49)
    ids = torch.randint(0, CELL_IDS, (rows, 49))
    ids[ids % 4 == 0] = 0  # unseen cells
    z[:, model.feature_dim :] = ids.float()
    ours = model._remember(grid, front_open, prev_action, z)
    theirs = reference(model._remember, grid, front_open, prev_action, z)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert not torch.equal(ours[0], grid)
    z[5, model.feature_dim + 2] = CELL_IDS + 1
    with pytest.raises(RuntimeError, match="cell id .* out of range"):
        model._remember(grid, front_open, prev_action, z)
