"""Sequence backbones behind one interface: Mamba-2 (default), GRU and a causal transformer.

A backbone maps token sequences (B, T, D) -> (B, T, D) for training, and steps one token at a
time from a recurrent state for imagination. States are `BatchState`s, so a planner can
`expand(k)` them to K candidates and `index` the survivors.

Adding a backbone: one `Backbone` subclass and one line in `BACKBONES`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lwm.models.ssm import (
    BRANCH_TOKENS,
    BatchState,
    Mamba2,
    Mamba2Branches,
    Mamba2State,
    branch_kernels,
    compiled,
)


@dataclass
class BackboneConfig:
    """Sizes and switches shared by all backbones (fields a backbone does not use are ignored)."""

    d_model: int = 128
    """Token width in and out; also the GRU's hidden size, so widths are equal across backbones."""
    n_layers: int = 2
    """Number of stacked layers (Mamba-2 blocks, GRU layers, transformer blocks)."""
    d_state: int = 16
    """Mamba-2: SSM state size N per head."""
    d_conv: int = 4
    """Mamba-2: causal conv kernel width K."""
    expand: int = 2
    """Mamba-2: inner width = expand * d_model."""
    headdim: int = 32
    """Mamba-2: channels P per SSM head (heads = expand * d_model / headdim)."""
    chunk_size: int = 32
    """Mamba-2: chunk length of the training scan (16-32 is fastest on CPU)."""
    n_heads: int = 4
    """Transformer: attention heads."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm / LayerNorm."""
    compile: bool = False
    """Mamba-2: run forward and the no-grad step through torch.compile (eager if it fails)."""
    bf16_matmul: bool = False
    """Mamba-2: no-grad step projections in bf16 (states and the scan stay fp32)."""


class Backbone(nn.Module, ABC):
    """(B, T, D) sequences for training; one (B, D) token at a time from a state for imagination.

    `step` may update `state` in place and return it (the fast no-grad path does): a state is
    consumed by stepping it, so `clone()` one you want to keep.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> y: (B, T, D), causal: y_t depends on x_1..x_t only."""
        raise NotImplementedError("forward(x: (B, T, D)) -> (B, T, D)")

    @abstractmethod
    def init_state(self, batch: int) -> BatchState:
        """The state before the first token, for `batch` sequences."""
        raise NotImplementedError("init_state(batch: int) -> BatchState")

    @abstractmethod
    def step(self, state: BatchState, x: Tensor) -> tuple[Tensor, BatchState]:
        """One token x: (B, D) -> y: (B, D) and the state after it."""
        raise NotImplementedError("step(state, x: (B, D)) -> (y: (B, D), state)")

    def branch(self, state: BatchState) -> BatchState:
        """A copy of `state` to grow many short branches from (`index` / `expand` it, then step
        it): imagination's candidate sequences. The same as `clone()` unless a backbone keeps
        branches cheaper than independent states (Mamba-2: `Mamba2Branches`)."""
        return state.clone()

    def prefill(self, x: Tensor, state: BatchState | None = None) -> tuple[Tensor, BatchState]:
        """Run a context x: (B, T, D) from `state` (None: the initial one) -> y (B, T, D), state.

        Token by token here; backbones with a parallel form override it.
        """
        state = self.init_state(x.shape[0]) if state is None else state
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(state, x[:, t])
            ys.append(y)
        return torch.stack(ys, dim=1), state


# --------------------------------------------------------------------------------------------
# Mamba-2
# --------------------------------------------------------------------------------------------


@dataclass
class LayerStates(BatchState):
    """One state per layer of a stack."""

    layers: tuple[BatchState, ...]


class Mamba2Backbone(Backbone):
    """Pre-norm residual stack of Mamba-2 blocks: h += block(rmsnorm(h)), then a final RMSNorm."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(
            Mamba2(
                cfg.d_model,
                cfg.d_state,
                cfg.d_conv,
                cfg.expand,
                cfg.headdim,
                cfg.chunk_size,
                cfg.norm_eps,
            )
            for _ in range(cfg.n_layers)
        )
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.d_model, cfg.norm_eps) for _ in self.blocks)
        self.norm_f = nn.RMSNorm(cfg.d_model, cfg.norm_eps)

    def prefill(self, x: Tensor, state: LayerStates | None = None) -> tuple[Tensor, LayerStates]:
        """Chunked scan over x: (B, T, D) from `state` -> y (B, T, D) and the final state."""
        return self._prefill(x, state, [block.conv_weight() for block in self.blocks])

    def _prefill(
        self, x: Tensor, state: LayerStates | None, conv_weights: list[Tensor],
        return_state: bool = True,
    ) -> tuple[Tensor, LayerStates | None]:
        """`prefill` given each block's `conv_weight()`: the unit torch.compile sees. Without
        `return_state` no state is made (see `Mamba2.forward`), as training's `forward` needs."""
        layer_states = []
        for i, (norm, block, w) in enumerate(
            zip(self.norms, self.blocks, conv_weights, strict=True)
        ):
            y, s = block(norm(x), None if state is None else state.layers[i], w,
                         return_state=return_state)
            x = x + y
            layer_states.append(s)
        return self.norm_f(x), LayerStates(tuple(layer_states)) if return_state else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, D) by the chunked scan (compiled if `cfg.compile`)."""
        prefill = _mamba2_prefill_compiled if self.cfg.compile else Mamba2Backbone._prefill
        return prefill(self, x, None, [block.conv_weight() for block in self.blocks], False)[0]

    def init_state(self, batch: int) -> LayerStates:
        """Zero conv ring buffers and SSM states, one `Mamba2State` per block."""
        return LayerStates(tuple(block.init_state(batch) for block in self.blocks))

    def step_ref(self, state: LayerStates, x: Tensor) -> tuple[Tensor, LayerStates]:
        """One token, functional and differentiable: x: (B, D) -> y: (B, D), a new state."""
        layer_states = []
        for norm, block, s in zip(self.norms, self.blocks, state.layers, strict=True):
            y, s = block.step_ref(s, norm(x))
            x = x + y
            layer_states.append(s)
        return self.norm_f(x), LayerStates(tuple(layer_states))

    def step_(
        self,
        convs: list[Tensor],
        ssms: list[Tensor],
        slot: int,
        x: Tensor,
        conv_weights: list[Tensor],
    ) -> Tensor:
        """One token through the whole stack, updating every block's state tensors in place.

        The unit torch.compile sees: one graph for the step, specialised on `slot = t % (K-1)`.
        conv_weights: each block's `conv_weight()`, made outside the graph (see there).
        """
        dtype = torch.bfloat16 if self.cfg.bf16_matmul else None
        for norm, block, conv, ssm, w in zip(
            self.norms, self.blocks, convs, ssms, conv_weights, strict=True
        ):
            x = x + block.step_(conv, ssm, slot, norm(x), dtype, w)
        return self.norm_f(x)

    def branch(self, state: LayerStates) -> LayerStates:
        """Each layer's state as `Mamba2Branches`, which share the SSM states instead of copying
        them (the SSD dual form). With `cfg.compile`, plain copies: the compiled step is
        specialised to them."""
        if self.cfg.compile:
            return state.clone()
        return LayerStates(tuple(
            Mamba2Branches.fork(s) if isinstance(s, Mamba2State) else s.clone()
            for s in state.layers
        ))

    def step_branches(self, state: LayerStates, x: Tensor) -> tuple[Tensor, LayerStates]:
        """One token on every branch of a `branch`ed state (no autograd): x (M, D) -> y (M, D)."""
        dtype = torch.bfloat16 if self.cfg.bf16_matmul else None
        layers = [Mamba2Branches.fork(s.materialize()) if s.tokens >= BRANCH_TOKENS else s
                  for s in state.layers]  # long paths cost O(s) a token: fold them
        kernels = branch_kernels(x, layers, dtype)
        if kernels is not None:  # the whole stack in one call
            paths = [s.room() for s in layers]
            weights = []
            for norm, block in zip(self.norms, self.blocks, strict=True):
                weights += [norm.weight, *block.native_weights()]
            y = kernels.mamba2_branch_stack(
                x, [*weights, self.norm_f.weight], self.cfg.norm_eps, self.blocks[0].norm.eps,
                [s.conv for s in layers], paths, [s.root.tensor for s in layers],
                [s.origin for s in layers],
                [s.tokens for s in layers], layers[0].t % (self.cfg.d_conv - 1))
            return y, LayerStates(tuple(s.advanced(p) for s, p in zip(layers, paths, strict=True)))
        layer_states = []
        for norm, block, s in zip(self.norms, self.blocks, layers, strict=True):
            y, s = block.step_branches(s, norm(x), dtype)
            x = x + y
            layer_states.append(s)
        return self.norm_f(x), LayerStates(tuple(layer_states))

    def step(self, state: LayerStates, x: Tensor) -> tuple[Tensor, LayerStates]:
        """x: (B, D) -> y: (B, D). With autograd on: `step_ref`. Otherwise (planning): in place,
        compiled if `cfg.compile`, and `state` itself is returned advanced by one token; a
        `branch`ed state steps by `step_branches` (imagination only: no autograd)."""
        if isinstance(state.layers[0], Mamba2Branches):
            return self.step_branches(state, x)
        if torch.is_grad_enabled():
            return self.step_ref(state, x)
        layers: tuple[Mamba2State, ...] = state.layers  # type: ignore[assignment]
        step_ = _mamba2_step_compiled if self.cfg.compile else Mamba2Backbone.step_
        slot = layers[0].t % (self.cfg.d_conv - 1)
        weights = [block.conv_weight() for block in self.blocks]
        y = step_(self, [s.conv for s in layers], [s.ssm for s in layers], slot, x, weights)
        for s in layers:
            s.t += 1
        return y, state


# Module level, so one compiled graph serves every instance and deep copies (ensembles) work.
_mamba2_prefill_compiled = compiled(Mamba2Backbone._prefill)
_mamba2_step_compiled = compiled(Mamba2Backbone.step_)


# --------------------------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------------------------


@dataclass
class GRUState(BatchState):
    """h: (B, L, D) hidden state of each of the L layers."""

    h: Tensor


class GRUBackbone(Backbone):
    """`nn.GRU` with hidden size d_model (cuDNN / oneDNN kernels, the speed baseline)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__(cfg)
        self.gru = nn.GRU(cfg.d_model, cfg.d_model, cfg.n_layers, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        return self.gru(x)[0]

    def prefill(self, x: Tensor, state: GRUState | None = None) -> tuple[Tensor, GRUState]:
        """x: (B, T, D) from `state` -> y (B, T, D) and the final state."""
        h0 = None if state is None else state.h.transpose(0, 1).contiguous()  # (L, B, D)
        y, h = self.gru(x, h0)
        return y, GRUState(h.transpose(0, 1))  # (B, L, D)

    def init_state(self, batch: int) -> GRUState:
        """Zero hidden states."""
        p = self.gru.weight_hh_l0
        return GRUState(p.new_zeros(batch, self.cfg.n_layers, self.cfg.d_model))

    def step(self, state: GRUState, x: Tensor) -> tuple[Tensor, GRUState]:
        """x: (B, D) -> y: (B, D), new state."""
        y, state = self.prefill(x[:, None], state)
        return y[:, 0], state


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


@dataclass
class KVCache(BatchState):
    """Keys and values seen so far, per layer (B, heads, t, head_dim), and the position t."""

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]
    t: int = 0


def sinusoidal_positions(t0: int, T: int, d: int, device: torch.device) -> Tensor:
    """(T, d) sin/cos encodings of positions t0..t0+T-1; unbounded, unlike a learned table."""
    pos = torch.arange(t0, t0 + T, device=device, dtype=torch.float)[:, None]  # (T, 1)
    freq = torch.exp(torch.arange(0, d, 2, device=device) * (-math.log(10000.0) / d))  # (d/2,)
    angles = pos * freq  # (T, d/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (T, d)


class TransformerBlock(nn.Module):
    """Pre-norm causal self-attention + MLP block."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )

    def forward(
        self, x: Tensor, past_k: Tensor | None = None, past_v: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D). Without a past: causal attention over x. With past keys/values
        (B, heads, t, hd): x is one new token (T = 1) attending to all of them and itself.
        Returns y (B, T, D) and the keys and values including x's."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (
            t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, heads, T, hd)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=past_k is None)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return x + self.mlp(self.ln2(x)), k, v


class TransformerBackbone(Backbone):
    """GPT-style causal transformer with sinusoidal positions; steps with a KV cache."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__(cfg)
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} not divisible by n_heads {cfg.n_heads}")
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, D), causal."""
        x = x + sinusoidal_positions(0, x.shape[1], x.shape[2], x.device)
        for block in self.blocks:
            x = block(x)[0]
        return self.ln_f(x)

    def init_state(self, batch: int) -> KVCache:
        """An empty cache: (B, heads, 0, hd) keys and values per layer."""
        hd = self.cfg.d_model // self.cfg.n_heads
        empty = self.ln_f.weight.new_zeros(batch, self.cfg.n_heads, 0, hd)
        return KVCache(k=(empty,) * len(self.blocks), v=(empty,) * len(self.blocks))

    def step(self, state: KVCache, x: Tensor) -> tuple[Tensor, KVCache]:
        """x: (B, D) -> y: (B, D); the cache grows by one position (O(t) per step)."""
        x = x[:, None] + sinusoidal_positions(state.t, 1, x.shape[1], x.device)  # (B, 1, D)
        ks, vs = [], []
        for block, past_k, past_v in zip(self.blocks, state.k, state.v, strict=True):
            x, k, v = block(x, past_k, past_v)
            ks.append(k)
            vs.append(v)
        return self.ln_f(x)[:, 0], KVCache(tuple(ks), tuple(vs), state.t + 1)


BACKBONES: dict[str, type[Backbone]] = {
    "mamba2": Mamba2Backbone,
    "gru": GRUBackbone,
    "transformer": TransformerBackbone,
}


def make_backbone(name: str, cfg: BackboneConfig | None = None) -> Backbone:
    """Build the backbone registered as `name` ("mamba2", "gru", "transformer")."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    return BACKBONES[name](cfg or BackboneConfig())
