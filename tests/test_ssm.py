"""The Mamba-2 block: each fast path against its pure-PyTorch reference and transformers."""

import warnings

import pytest
import torch

from lwm.models import ssm
from lwm.models.ssm import (
    BRANCH_TOKENS,
    Mamba2,
    Mamba2Branches,
    causal_conv1d,
    causal_conv1d_ref,
    compiled,
    ssd_chunk_scan_ref,
    ssd_step_,
    ssd_step_ref,
)

D_MODEL, T = 32, 21  # T is not a multiple of any chunk size below


@pytest.fixture(autouse=True)
def _seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def make_block(chunk_size: int = 8) -> Mamba2:
    block = Mamba2(D_MODEL, d_state=8, headdim=16, chunk_size=chunk_size)
    with torch.no_grad():  # larger dt than the init so that decay matters over T steps
        block.dt_bias.add_(1.0)
    return block


def ssd_inputs(b: int = 2, H: int = 3, P: int = 4, N: int = 5):
    x = torch.randn(b, T, H, P)
    dt = torch.nn.functional.softplus(torch.randn(b, T, H))
    A = -torch.rand(H) - 0.1
    B, C = torch.randn(b, T, N), torch.randn(b, T, N)
    return x, dt, A, B, C


def test_causal_conv1d_matches_ref():
    x, w, bias = torch.randn(2, T, 7), torch.randn(7, 4), torch.randn(7)
    torch.testing.assert_close(causal_conv1d(x, w, bias), causal_conv1d_ref(x, w, bias))


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 32])
def test_chunk_scan_equals_step_by_step(chunk_size):
    x, dt, A, B, C = ssd_inputs()
    h0 = torch.randn(2, 3, 4, 5)  # (b, H, P, N)
    y, h_final = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, h0)
    h, ys = h0, []
    for t in range(T):
        y_t, h = ssd_step_ref(h, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y_t)
    torch.testing.assert_close(y, torch.stack(ys, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_final, h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [8, 32])  # T = 21: three chunks, or one
def test_a_scan_without_the_final_state_gives_the_same_outputs(chunk_size):
    x, dt, A, B, C = ssd_inputs()
    y, _ = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size)
    y_only, none = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, final_state=False)
    assert none is None
    torch.testing.assert_close(y_only, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [8, 32])
def test_backbone_forward_equals_prefill_with_gradients(chunk_size):
    # Training's forward makes no state (one chunk: no state passing at all); outputs and
    # gradients are those of the prefill that does.
    from lwm.models.backbones import BackboneConfig, make_backbone

    backbone = make_backbone("mamba2", BackboneConfig(
        d_model=D_MODEL, d_state=8, headdim=16, chunk_size=chunk_size))
    x = torch.randn(3, T, D_MODEL)
    grads = []
    for run in (backbone, lambda v: backbone.prefill(v)[0]):
        backbone.zero_grad()
        y = run(x)
        y.square().mean().backward()
        grads.append((y.detach(), [p.grad.clone() for p in backbone.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_inplace_step_equals_ref():
    x, dt, A, B, C = ssd_inputs()
    h = torch.randn(2, 3, 4, 5)  # (b, H, P, N)
    y_ref, h_ref = ssd_step_ref(h, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    y = ssd_step_(h, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


@pytest.mark.parametrize("chunk_size", [4, 8, 16, 32])
def test_block_forward_equals_stepping(chunk_size):
    block = make_block(chunk_size)
    u = torch.randn(3, T, D_MODEL)
    y, final = block(u)
    state, ys = block.init_state(3), []
    for t in range(T):
        y_t, state = block.step_ref(state, u[:, t])
        ys.append(y_t)
    torch.testing.assert_close(y, torch.stack(ys, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final.ssm, state.ssm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final.conv, state.conv)
    assert final.t == state.t == T


def test_block_inplace_step_equals_ref():
    block = make_block()
    u = torch.randn(3, T, D_MODEL)
    ref, fast = block.init_state(3), block.init_state(3)
    with torch.no_grad():
        for t in range(T):
            y_ref, ref = block.step_ref(ref, u[:, t])
            y = block.step_(fast.conv, fast.ssm, fast.t % 3, u[:, t])
            fast.t += 1
            torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast.ssm, ref.ssm, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast.conv, ref.conv)


def test_forward_continues_from_state():
    block = make_block()
    u = torch.randn(2, T, D_MODEL)
    y, final = block(u)
    y1, mid = block(u[:, :10])
    y2, end = block(u[:, 10:], mid)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end.ssm, final.ssm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end.conv, final.conv)


@pytest.mark.parametrize("chunk_size", [8, 16])
def test_matches_transformers_mamba2_mixer(chunk_size):
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    block = make_block(chunk_size)
    config = Mamba2Config(
        hidden_size=D_MODEL,
        state_size=8,
        head_dim=16,
        num_heads=4,
        expand=2,
        n_groups=1,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        chunk_size=chunk_size,
        layer_norm_epsilon=1e-5,
        num_hidden_layers=1,
    )
    mixer = Mamba2Mixer(config, layer_idx=0).eval()
    # Same parameter names and shapes (conv1d weight (C, 1, K) in both).
    mixer.load_state_dict(block.state_dict())
    u = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(block(u)[0], mixer(u), atol=1e-5, rtol=1e-5)


def test_gradients_finite():
    block = make_block()
    u = torch.randn(2, T, D_MODEL, requires_grad=True)
    y, state = block(u)
    (y.square().mean() + state.ssm.square().mean()).backward()
    grads = [u.grad] + [p.grad for p in block.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_state_expand_and_index():
    block = make_block()
    _, state = block(torch.randn(2, 5, D_MODEL))
    k = 3
    big = state.expand(k)
    assert big.ssm.shape[0] == 2 * k and big.t == state.t
    x = torch.randn(2 * k, D_MODEL)
    y_big, big = block.step_ref(big, x)
    for i in range(2 * k):  # candidate i continues batch element i // k
        y_i, s_i = block.step_ref(state.index(torch.tensor([i // k])), x[i : i + 1])
        torch.testing.assert_close(y_big[i : i + 1], y_i)
        torch.testing.assert_close(big.index(slice(i, i + 1)).ssm, s_i.ssm)
    clone = state.clone()
    clone.ssm.add_(1.0)
    assert not torch.equal(clone.ssm, state.ssm)
    # Integer rows (taken as whole rows: index_select) select as indexing does, negative ones
    # from the end; the result owns its memory.
    for idx in (torch.tensor([1, 0, 1, -1, -2]), torch.tensor([], dtype=torch.long),
                torch.tensor([2, 5, 0], dtype=torch.int32)):
        taken = big.index(idx)
        for name in ("conv", "ssm"):
            expected = getattr(big, name)[idx.long()]
            torch.testing.assert_close(getattr(taken, name), expected, rtol=0, atol=0)
        assert taken.t == big.t
    taken = big.index(torch.tensor([0]))
    taken.ssm.add_(1.0)
    assert not torch.equal(taken.ssm[0], big.ssm[0])
    mask = torch.tensor([True, False, True, False, False, True])
    assert torch.equal(big.index(mask).ssm, big.ssm[mask])


@pytest.mark.parametrize("roots", [1, 3, 12])  # each of `root_read`'s three ways
def test_branches_equal_independent_states(roots):
    # Branches off shared roots (the SSD dual form) give the outputs and, materialized, the
    # states of stepping independent copies, through gathers that drop and repeat branches.
    block = make_block()
    _, state = block(torch.randn(roots, 5, D_MODEL))
    M = 2 * roots + 3
    idx = torch.randint(0, roots, (M,))
    plain, branches = state.clone().index(idx), Mamba2Branches.fork(state).index(idx)
    with torch.no_grad():
        for _ in range(6):
            x = torch.randn(M, D_MODEL)
            y_plain = block.step_(plain.conv, plain.ssm, plain.t % 3, x)
            plain.t += 1
            y, branches = block.step_branches(branches, x)
            torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)
            pick = torch.randint(0, M, (M,))
            plain, branches = plain.index(pick), branches.index(pick)
    folded = branches.materialize()
    torch.testing.assert_close(folded.ssm, plain.ssm, atol=1e-5, rtol=1e-5)
    assert torch.equal(folded.conv, plain.conv) and folded.t == plain.t == state.t + 6
    assert branches.tokens == 6 and branches.path.shape[1] == 7  # room for one more


def test_branches_leave_the_root_alone_and_fold_long_paths():
    from lwm.models.backbones import BackboneConfig, make_backbone

    backbone = make_backbone("mamba2", BackboneConfig(d_model=D_MODEL, d_state=8, headdim=16))
    with torch.no_grad():
        _, state = backbone.prefill(torch.randn(2, 5, D_MODEL))
        before = state.clone()
        plain, branches = state.clone().expand(2), backbone.branch(state).expand(2)
        for _ in range(BRANCH_TOKENS + 3):
            x = torch.randn(4, D_MODEL)
            y_plain, plain = backbone.step(plain, x)
            y, branches = backbone.step(branches, x)
            torch.testing.assert_close(y, y_plain, atol=1e-4, rtol=1e-4)
    for layer in branches.layers:  # folded once at BRANCH_TOKENS, then 3 more tokens
        assert isinstance(layer, Mamba2Branches) and layer.path.shape[1] == 3
    for old, new in zip(before.layers, state.layers, strict=True):
        assert torch.equal(old.ssm, new.ssm) and torch.equal(old.conv, new.conv)


def test_states_concatenate_along_the_batch():
    from lwm.models.ssm import BatchState

    block = make_block()
    _, state = block(torch.randn(3, 5, D_MODEL))
    branches = Mamba2Branches.fork(state)
    for s in (state, branches):
        a, b = s.index(torch.tensor([2, 0])), s.index(torch.tensor([1]))
        both, expected = BatchState.cat([a, b]), s.index(torch.tensor([2, 0, 1]))
        for got, want in zip(both.tensors(), expected.tensors(), strict=True):
            assert torch.equal(got, want)
    assert BatchState.cat([branches, branches]).root is branches.root  # shared, not copied
    later = state.clone()
    later.t += 1
    with pytest.raises(ValueError, match="cannot concatenate states that differ"):
        BatchState.cat([state, later])


def test_branches_step_into_the_room_a_gather_leaves():
    # A gathered branch state has room for the next token: the step writes it there instead
    # of copying the path, reads the same as stepping a compact copy, and gathers from two
    # states into one output (the prefix tree's chunks) equal one gather of the two.
    from lwm.models.ssm import BatchState

    block = make_block()
    _, state = block(torch.randn(2, 5, D_MODEL))
    with torch.no_grad():
        branches = Mamba2Branches.fork(state).take(torch.tensor([0, 1, 1]))
        for _ in range(3):
            branches = block.step_branches(branches, torch.randn(3, D_MODEL))[1]
            branches = branches.take(torch.tensor([2, 0, 1]))
        assert branches.tokens == 3 and branches.path.shape[1] == 4
        compact = branches.compact().clone()
        assert compact.path.shape[1] == 3
        x = torch.randn(3, D_MODEL)
        buffer = branches.path.data_ptr()
        y, stepped = block.step_branches(branches, x)
        y_ref, ref = block.step_branches(compact, x)
        torch.testing.assert_close(y, y_ref)
        assert stepped.path.data_ptr() == buffer and stepped.tokens == ref.tokens == 4
        assert torch.equal(stepped.path, ref.path)
        other = stepped.clone()
        out = stepped.new_rows(5)
        stepped.take(torch.tensor([2, 0]), out, 0)
        other.take(torch.tensor([1, 1, 0]), out, 2)
        expected = BatchState.cat([stepped.take(torch.tensor([2, 0])),
                                   other.take(torch.tensor([1, 1, 0]))])
        assert out.tokens == 4 and out.path.shape[1] == 5
        for got, want in zip(out.compact().tensors(), expected.tensors(), strict=True):
            assert torch.equal(got, want)


def test_compiled_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    double = compiled(lambda x: 2 * x)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert double(torch.ones(1)).item() == 2.0
    assert double.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls run eagerly and silently
        assert double(torch.ones(1)).item() == 2.0


def test_cpu_tensors_take_the_reference_path():
    # mamba-ssm's kernels are CUDA-only: installed or not, CPU tensors must run the reference.
    x, dt, A, B, C = ssd_inputs()
    y, _ = ssm.ssd_chunk_scan(x, dt, A, B, C, 8)
    torch.testing.assert_close(y, ssd_chunk_scan_ref(x, dt, A, B, C, 8)[0])


def test_what_is_kept_while_frozen_follows_its_weights():
    # Without autograd, derived weights are kept between calls; any change to a weight (in
    # place, a load, a cast) makes them again, and with autograd they are made afresh.
    block = make_block()
    reference = block.conv1d.weight[:, 0].t().contiguous().t()
    with torch.no_grad():
        kept = block.conv_weight()
        assert block.conv_weight() is kept and torch.equal(kept, reference)
        _, taps, newest = block._branch_weights()
        assert block._branch_weights()[1] is taps
        block.conv1d.weight.mul_(2.0)
        assert torch.equal(block.conv_weight(), 2 * reference)
        assert torch.equal(block._branch_weights()[2], 2 * newest)
        block.load_state_dict({k: v + 1 for k, v in block.state_dict().items()})
        assert torch.equal(block.conv_weight(), 2 * reference + 1)
        assert block.double().conv_weight().dtype == torch.float64
    fresh = block.conv_weight()
    assert fresh.requires_grad and fresh is not block.conv_weight()
