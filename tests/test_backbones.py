"""Every backbone: sequence pass == token-by-token stepping, K-candidate states, compile."""

import pytest
import torch

from lwm.models import BACKBONES, BackboneConfig, make_backbone

CFG = BackboneConfig(d_model=32, n_layers=2, d_state=8, headdim=16, chunk_size=8, n_heads=4)
T = 13  # not a multiple of the chunk size


@pytest.fixture(autouse=True)
def _seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def make(name: str, **changes) -> torch.nn.Module:
    backbone = make_backbone(name, BackboneConfig(**{**CFG.__dict__, **changes}))
    if name == "mamba2":
        with torch.no_grad():  # larger dt than the init so that decay matters over T steps
            for block in backbone.blocks:
                block.dt_bias.add_(1.0)
    return backbone


def step_all(backbone, x, state=None):
    state = backbone.init_state(x.shape[0]) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        y, state = backbone.step(state, x[:, t])
        ys.append(y)
    return torch.stack(ys, 1), state


def test_registry():
    assert set(BACKBONES) == {"mamba2", "gru", "transformer"}
    with pytest.raises(ValueError, match="unknown backbone"):
        make_backbone("lstm")


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_forward_equals_stepping(name, grad):
    backbone = make(name)
    x = torch.randn(3, T, CFG.d_model)
    with torch.set_grad_enabled(grad):
        y = backbone(x)
        y_steps, _ = step_all(backbone, x)
    assert y.shape == (3, T, CFG.d_model)
    torch.testing.assert_close(y_steps, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_prefill_then_step_equals_stepping(name):
    backbone = make(name)
    x = torch.randn(2, T, CFG.d_model)
    with torch.no_grad():
        y_all, _ = step_all(backbone, x)
        y_ctx, state = backbone.prefill(x[:, :7])
        y_rest, _ = step_all(backbone, x[:, 7:], state)
    torch.testing.assert_close(torch.cat([y_ctx, y_rest], 1), y_all, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_gradients_finite(name):
    backbone = make(name)
    x = torch.randn(2, T, CFG.d_model, requires_grad=True)
    backbone(x).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_expanded_candidates_step_like_each_copy(name):
    backbone, k = make(name), 4
    with torch.no_grad():
        _, state = backbone.prefill(torch.randn(2, 5, CFG.d_model))
        x = torch.randn(2 * k, 3, CFG.d_model)
        y_big, big = step_all(backbone, x, state.clone().expand(k))
        for i in range(2 * k):  # candidate i continues batch element i // k
            y_i, s_i = step_all(backbone, x[i : i + 1], state.clone().index(torch.tensor([i // k])))
            torch.testing.assert_close(y_big[i : i + 1], y_i, atol=1e-5, rtol=1e-5)
        best = torch.tensor([5, 2])
        y_best, _ = step_all(backbone, x[best], big.index(best))
        y_again, _ = step_all(backbone, x, big)
        torch.testing.assert_close(y_best, y_again[best], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile takes 30-90 s on a shared 2-core machine
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_compiled_mamba2_equals_eager(bf16):
    eager, fast = make("mamba2", bf16_matmul=bf16), make("mamba2", compile=True, bf16_matmul=bf16)
    fast.load_state_dict(eager.state_dict())
    x = torch.randn(4, T, CFG.d_model)
    with torch.no_grad():
        y_eager, _ = step_all(eager, x)
        y_fast, _ = step_all(fast, x)
        torch.testing.assert_close(fast(x), eager(x), atol=1e-5, rtol=1e-5)
    atol = 2e-2 if bf16 else 1e-5
    torch.testing.assert_close(y_fast, y_eager, atol=atol, rtol=atol)


def test_shipped_checkpoint_backbone_matches_transformers_mixers():
    # The trained GoToLocal model's backbone loads with its exact keys and shapes, and computes
    # what a stack of transformers' Mamba2Mixer computes with the same weights, by the scan and
    # by both steps: a speed change that altered the math or the layout would fail here.
    import json
    from importlib.resources import files

    from safetensors.torch import load_file
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    ckpt = files("lwm.resources") / "checkpoints" / "babyai-goto"
    cfg = BackboneConfig(**json.loads((ckpt / "config.json").read_text())["config"]["backbone_cfg"])
    weights = {
        k.removeprefix("backbone."): v
        for k, v in load_file(str(ckpt / "model.safetensors")).items()
        if k.startswith("backbone.")
    }
    backbone = make_backbone("mamba2", cfg).eval()
    assert {k: v.shape for k, v in backbone.state_dict().items()} == {
        k: v.shape for k, v in weights.items()
    }
    backbone.load_state_dict(weights)

    mixer_cfg = Mamba2Config(
        hidden_size=cfg.d_model,
        state_size=cfg.d_state,
        head_dim=cfg.headdim,
        num_heads=cfg.expand * cfg.d_model // cfg.headdim,
        expand=cfg.expand,
        n_groups=1,
        conv_kernel=cfg.d_conv,
        use_bias=False,
        use_conv_bias=True,
        chunk_size=cfg.chunk_size,
        layer_norm_epsilon=cfg.norm_eps,
        num_hidden_layers=cfg.n_layers,
    )
    mixers = []
    for i in range(cfg.n_layers):
        mixer = Mamba2Mixer(mixer_cfg, layer_idx=i).eval()
        mixer.load_state_dict(
            {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"blocks.{i}.")}
        )
        mixers.append(mixer)

    x = torch.randn(3, 40, cfg.d_model)  # longer than a chunk
    with torch.no_grad():
        h = x
        for norm, mixer in zip(backbone.norms, mixers, strict=True):
            h = h + mixer(norm(h))
        expected = backbone.norm_f(h)
        torch.testing.assert_close(backbone(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_all(backbone, x)[0], expected, atol=1e-5, rtol=1e-5)
    with torch.enable_grad():
        torch.testing.assert_close(step_all(backbone, x)[0], expected, atol=1e-5, rtol=1e-5)
