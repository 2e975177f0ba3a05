"""Mamba-2 (SSD) block in pure PyTorch: a chunked scan for training, an O(1) step for imagination.

Notation follows the Mamba-2 paper (Dao & Gu, 2024) with n_groups = 1: per head h the state
h_t (P, N) evolves as h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T and y_t = h_t C_t + D x_t, with
A = -exp(A_log) a negative scalar per head and dt_t = softplus(dt_raw + dt_bias). States are
stored (B, H, P, N), as mamba-ssm and transformers store them: N innermost makes y = h C a
reduction over contiguous memory, which the compiled CPU state update runs ~20 % faster than a
reduction over N strided by P (measured on the update alone at batch 1024).

Three ways to run the same math, each fast path beside the pure-PyTorch `*_ref` it is tested
against:

- `ssd_chunk_scan_ref` / `ssd_chunk_scan`: the whole sequence at once (training); the latter uses
  mamba-ssm's Triton kernel when the tensors are on CUDA and `mamba_ssm` imports.
- `ssd_step_ref` / `ssd_step_`: one token, functional vs. in place (imagination); the in-place
  version uses mamba-ssm's `selective_state_update` on CUDA.
- `Mamba2.step_ref` / `Mamba2.step_`: the whole block for one token; `compiled` wraps a step or
  forward in `torch.compile(dynamic=False)` with a warned-once eager fallback.

Nothing here needs CUDA or `mamba_ssm`: importing this module never fails on a CPU machine.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lwm.models import native

try:  # mamba-ssm imports CUDA extensions unguarded, so any failure means "not available".
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # ImportError, OSError for missing CUDA libs, RuntimeError, ...
    selective_state_update = None
    mamba_chunk_scan_combined = None

HAS_MAMBA_SSM = mamba_chunk_scan_combined is not None

# torch.compile's default of 8 graphs per code object is shared by all instances of a module and
# by every batch size / ring slot; past it, dynamo silently runs eager. K candidates, three ring
# slots and a few layers exceed 8 quickly.
_RECOMPILE_LIMIT = 64


# --------------------------------------------------------------------------------------------
# Recurrent states
# --------------------------------------------------------------------------------------------


def _map_batch(fn: Callable[[Tensor], Tensor], value: Any) -> Any:
    """Apply `fn` to every tensor in `value` (a tensor, a tuple of them, or a `BatchState`)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_batch(fn, v) for v in value)
    if isinstance(value, BatchState):
        return value.map(fn)
    return value


class BatchState:
    """Base for recurrent-state dataclasses whose tensors all carry the batch at dim 0.

    Subclasses are dataclasses of tensors, tuples of tensors, nested `BatchState`s and plain
    Python values (step counters), which `clone`, `expand` and `index` copy unchanged.
    """

    def map(self, fn: Callable[[Tensor], Tensor]) -> Self:
        """A copy of this state with `fn` applied to every tensor."""
        changes = {f.name: _map_batch(fn, getattr(self, f.name)) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)

    def clone(self) -> Self:
        """A deep copy; `step` may update a state in place, so clone one you want to keep."""
        return self.map(torch.clone)

    def expand(self, k: int) -> Self:
        """(B, ...) -> (B*k, ...): each batch element repeated k times in a row (K candidates).

        The result owns its memory, so the copies can be stepped in place independently.
        """
        return self.map(lambda t: t.repeat_interleave(k, dim=0))

    @staticmethod
    def cat(states: Sequence[BatchState]) -> BatchState:
        """States of the same kind side by side along the batch (their step counters and
        shared tensors must agree)."""
        return _cat_batch(list(states))

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor the state holds, in field order (not the `Shared` ones it points to)."""
        return _tensors(self)

    def index(self, idx: Tensor | slice | int) -> Self:
        """Select batch elements, e.g. the best candidates: `state.index(torch.tensor([3, 7]))`."""
        if isinstance(idx, Tensor) and idx.dim() == 1 and not idx.is_floating_point() \
                and idx.dtype != torch.bool:
            first = next(self.tensors(), None)
            if first is not None:  # negative indices count from the end
                idx = torch.where(idx < 0, idx + first.shape[0], idx)
            return self.take(idx)
        return self.map(lambda t: t[idx].contiguous())

    def take(self, rows: Tensor, out: Self | None = None, at: int = 0) -> Self:
        """`index` for a 1-D tensor of non-negative rows, without checking them (the fast path
        of imagination's bookkeeping). With `out` (`new_rows`), the rows are written into its
        rows at..at + len(rows), and `out` is returned: gathering from several states into one
        without concatenating."""
        if out is None:  # differentiable
            return dataclasses.replace(self, **{
                f.name: _take(getattr(self, f.name), rows) for f in dataclasses.fields(self)})
        for f in dataclasses.fields(self):
            _take_into(getattr(self, f.name), rows, getattr(out, f.name), at)
        return out

    def new_rows(self, n: int) -> Self:
        """A state of this kind with n uninitialised rows (for `take` to fill)."""
        return dataclasses.replace(self, **{
            f.name: _new_rows(getattr(self, f.name), n) for f in dataclasses.fields(self)})

    def compact(self) -> Self:
        """This state without spare room (`Mamba2Branches` keeps some), for concatenation."""
        return self


def _take(value: Any, rows: Tensor) -> Any:
    """`BatchState.take` of one field."""
    if isinstance(value, Tensor):
        return value.index_select(0, rows)
    if isinstance(value, tuple):
        return tuple(_take(v, rows) for v in value)
    if isinstance(value, BatchState):
        return value.take(rows)
    return value


def _take_into(value: Any, rows: Tensor, out: Any, at: int) -> None:
    """value's rows (a tensor, a tuple of them, a `BatchState`) into out's rows from `at`."""
    if isinstance(value, Tensor):
        torch.index_select(value, 0, rows, out=out[at : at + len(rows)])
    elif isinstance(value, tuple):
        for v, o in zip(value, out, strict=True):
            _take_into(v, rows, o, at)
    elif isinstance(value, BatchState):
        value.take(rows, out, at)


def _new_rows(value: Any, n: int) -> Any:
    """`BatchState.new_rows` of one field."""
    if isinstance(value, Tensor):
        return value.new_empty(n, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_new_rows(v, n) for v in value)
    if isinstance(value, BatchState):
        return value.new_rows(n)
    return value


def _cat_batch(values: list[Any]) -> Any:
    """Concatenate matching tensors (tuples of them, `BatchState`s) along dim 0; other values
    (step counters, `Shared` tensors) must agree and are kept."""
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, tuple):
        return tuple(_cat_batch(list(parts)) for parts in zip(*values, strict=True))
    if isinstance(first, BatchState):
        values = [v.compact() for v in values]
        first = values[0]
        return dataclasses.replace(first, **{
            f.name: _cat_batch([getattr(v, f.name) for v in values])
            for f in dataclasses.fields(first)
        })
    if any(v is not first and v != first for v in values[1:]):
        raise ValueError(f"cannot concatenate states that differ in {first!r}")
    return first


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in `value` (a tensor, a tuple of them, or a `BatchState`), as `_map_batch`
    walks them."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, BatchState):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


@dataclass
class Mamba2State(BatchState):
    """Recurrent state of one Mamba-2 block.

    conv: (B, K-1, C) ring buffer of the last K-1 conv inputs; slot `t % (K-1)` holds the oldest.
    ssm: (B, H, P, N) SSM state per head.
    t: tokens consumed so far (picks the ring slot; the same for all batch elements).
    """

    conv: Tensor
    ssm: Tensor
    t: int = 0

    def conv_ordered(self) -> Tensor:
        """(B, K-1, C) the ring buffer in time order, oldest first."""
        return self.conv.roll(-(self.t % self.conv.shape[1]), dims=1)


@dataclass(frozen=True, eq=False)  # compared by identity: the same root or not
class Shared:
    """A tensor that states carry but do not index by batch (`BatchState.map` leaves it as is)."""

    tensor: Tensor


BRANCH_TOKENS = 32
"""Tokens a `Mamba2Branches` state keeps before stepping folds them into a plain state."""


@dataclass
class Mamba2Branches(BatchState):
    """Mamba-2 state of many short branches off a few root states, kept as root + path.

    Imagination steps every distinct prefix of many candidate sequences from one real state per
    environment. Stepping per-branch (B, H, P, N) states reads and writes them several times a
    token (16 KiB a branch and layer at the `small` preset), and every branching prefix copies
    them. Here the branches share their root's SSM state (never copied or modified) and carry
    only what happened since: the SSM inputs of each token on the path, about 1 KiB a token.
    With a_j = dt_j A the output at path token s is the SSD dual form (`ssd_chunk_scan_ref`
    within one chunk):

        y_s = exp(L_s) (h_root C_s) + sum_{j<=s} exp(L_s - L_j) dt_j (C_s . B_j) x_j,
        L_s = a_1 + ... + a_s

    so a token costs O(s) small products and no state traffic. `materialize` folds a path into a
    plain `Mamba2State`; stepping does so once a path holds `BRANCH_TOKENS` tokens.

    root: (R, H, P, N) shared SSM states; origin: (M,) each branch's root; conv: (M, K-1, C)
    ring buffer as in `Mamba2State`; path: (M, >= s, H*P + N + 2H) each path token's x (H, P),
    B (N), dt (H) and L (H), packed so that branching gathers one tensor (`parts`), of which
    the first s = `tokens` are the path: `take` leaves room for one more, so the step writes
    its token there instead of copying the path into a longer one; t: tokens consumed, the
    root's included.
    """

    root: Shared
    origin: Tensor
    conv: Tensor
    path: Tensor
    t: int = 0
    tokens: int = 0

    def new_rows(self, n: int) -> Mamba2Branches:
        """n uninitialised rows, with room after the path for the next token."""
        return dataclasses.replace(
            self, origin=self.origin.new_empty(n),
            conv=self.conv.new_empty(n, *self.conv.shape[1:]),
            path=self.path.new_empty(n, self.tokens + 1, self.path.shape[-1]))

    def take(self, rows: Tensor, out: Mamba2Branches | None = None,
             at: int = 0) -> Mamba2Branches:
        """See `BatchState.take`: the path is copied into the room `new_rows` leaves (without
        autograd; with it, the plain differentiable gather)."""
        if out is None:
            if torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors()):
                return super().take(rows)
            out, at = self.new_rows(len(rows)), 0
        end = at + len(rows)
        torch.index_select(self.origin, 0, rows, out=out.origin[at:end])
        torch.index_select(self.conv, 0, rows, out=out.conv[at:end])
        torch.index_select(self.path[:, : self.tokens], 0, rows,
                           out=out.path[at:end, : self.tokens])
        return out

    def compact(self) -> Mamba2Branches:
        return dataclasses.replace(self, path=self.path[:, : self.tokens])

    def room(self) -> Tensor:
        """The path buffer (M, > tokens, F) the next token is written into: this state's own
        when `take` left room, else a copy one token longer."""
        s, path = self.tokens, self.path
        if path.shape[1] > s:
            return path
        return torch.cat([path[:, :s], path.new_empty(len(path), 1, path.shape[-1])], dim=1)

    def advanced(self, path: Tensor) -> Mamba2Branches:
        """This state one token on, its path `path` (`room`) with the token written."""
        return dataclasses.replace(self, path=path[:, : self.tokens + 1], t=self.t + 1,
                                   tokens=self.tokens + 1)

    @classmethod
    def fork(cls, state: Mamba2State) -> Mamba2Branches:
        """Branches that start at each of `state`'s R rows, one each (index or expand them)."""
        R, H, P, N = state.ssm.shape
        return cls(
            root=Shared(state.ssm), origin=torch.arange(R, device=state.ssm.device),
            conv=state.conv.clone(), path=state.ssm.new_empty(R, 0, H * P + N + 2 * H),
            t=state.t,
        )

    def parts(self, path: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A packed path (M, s, F) (this state's by default) -> views x (M, s, H, P), B (M, s,
        N), dt (M, s, H), L (M, s, H)."""
        path = self.path[:, : self.tokens] if path is None else path
        _, H, P, N = self.root.tensor.shape
        x, B, dt, L = path.split([H * P, N, H, H], dim=-1)
        return x.unflatten(-1, (H, P)), B, dt, L

    def root_read(self, C: Tensor) -> Tensor:
        """h_root C for each branch: C (M, N) -> (M, H, P)."""
        root = self.root.tensor
        R, H, P, N = root.shape
        if R == 1:  # one environment: a single matmul against its state
            return F.linear(C, root.reshape(H * P, N)).view(-1, H, P)
        if R <= 8:  # a few: every root against every C, then each branch's own
            every = F.linear(C, root.reshape(R * H * P, N)).view(-1, R, H * P)
            rows = torch.arange(len(C), device=C.device)
            return every[rows, self.origin].view(-1, H, P)
        mine = root.index_select(0, self.origin)  # (M, H, P, N)
        return (mine * C[:, None, None, :]).sum(-1)

    def materialize(self) -> Mamba2State:
        """The plain state (M, H, P, N) after each branch's path."""
        x, B, dt, L = self.parts()
        last = L[:, -1:] if L.shape[1] else torch.zeros_like(L[:, :1])
        weight = torch.exp(last - L) * dt  # (M, s, H)
        path = torch.einsum("msh,mshp,msn->mhpn", weight, x, B)
        start = self.root.tensor.index_select(0, self.origin)
        start = start * torch.exp(last[:, 0])[..., None, None]
        return Mamba2State(conv=self.conv, ssm=(start + path).contiguous(), t=self.t)


# --------------------------------------------------------------------------------------------
# Functional pieces
# --------------------------------------------------------------------------------------------


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise causal conv1d, the textbook way.

    x: (B, T, C); weight: (C, K); bias: (C,). Returns (B, T, C).
    """
    T = x.shape[1]
    C, K = weight.shape
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=K - 1, groups=C)
    return y[..., :T].transpose(1, 2)  # (B, T, C)


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, context: Tensor | None = None
) -> Tensor:
    """Depthwise causal conv1d as K shifted multiply-adds.

    On CPU the depthwise `F.conv1d` backward costs ~20 ms a call at training shapes; K shifted
    multiply-adds are several times cheaper and fuse under torch.compile.

    x: (B, T, C); weight: (C, K); bias: (C,); context: (B, K-1, C) inputs before x (oldest
    first), zeros if None. Returns (B, T, C).
    """
    T, K = x.shape[1], weight.shape[1]
    if context is None:
        xp = F.pad(x, (0, 0, K - 1, 0))  # (B, T+K-1, C)
    else:
        xp = torch.cat([context.to(x.dtype), x], dim=1)  # (B, T+K-1, C)
    y = xp[:, K - 1 :] * weight[:, K - 1]
    for k in range(K - 1):
        y = y + xp[:, k : k + T] * weight[:, k]
    return y if bias is None else y + bias


class RMSNormGated(nn.Module):
    """Mamba-2's gated RMSNorm, gate before norm: weight * rmsnorm(y * silu(z))."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """y, z: (..., E) -> (..., E)."""
        return F.rms_norm(y * F.silu(z), (y.shape[-1],), self.weight, self.eps)


def segsum(a: Tensor) -> Tensor:
    """Stable segment sums: out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, else -inf.

    a: (..., T). Returns (..., T, T); exp of it is the decay matrix from step j to step i.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # (..., T_i, T_j): column j is a copy of a
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    # Summing down the rows of the strictly lower part: row i, column j holds a[j+1] + ... + a[i].
    out = a.masked_fill(~below, 0).cumsum(-2)
    return out.masked_fill(below.T, -math.inf)  # j > i: no path back in time


def ssd_chunk_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    h0: Tensor | None = None,
    final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """SSD chunked scan (the paper's "minimal" algorithm), without the D skip.

    Within a chunk the output is a masked, decayed attention-like product (quadratic in the
    chunk length, matmul-friendly); across chunks only the (H, P, N) states are passed on.

    x: (B, T, H, P); dt: (B, T, H) after softplus; A: (H,) negative; B, C: (B, T, N);
    h0: (B, H, P, N) initial state or None. Returns y: (B, T, H, P) and the final state
    (B, H, P, N), or None without `final_state`: from a zero state, a sequence that fits in
    one chunk then needs step 1 alone (training's case). T need not be a multiple of
    `chunk_size`.
    """
    b, T, H, P = x.shape
    N = B.shape[-1]
    L = min(chunk_size, T)  # a sequence shorter than a chunk is one chunk, not padded to one
    pad = -T % L
    # Padded steps have dt = 0: no decay and no input, so the final state is the state at T.
    x, dt, B, C = (F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)) for v in (x, dt, B, C))
    c = (T + pad) // L
    xdt = (x * dt[..., None]).view(b, c, L, H, P)  # (b, c, l, H, P)
    B = B.view(b, c, L, N)  # (b, c, l, N)
    C = C.view(b, c, L, N)
    a = (dt * A).view(b, c, L, H).permute(0, 3, 1, 2)  # (b, H, c, l): log decay of each step
    a_cum = a.cumsum(-1)  # (b, H, c, l)

    # 1. Within chunks: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1..i}) dt_j x_j.
    decay = torch.exp(segsum(a))  # (b, H, c, l, s)
    CB = torch.einsum("bcln,bcsn->bcls", C, B)  # (b, c, l, s)
    M = CB[:, None] * decay  # (b, H, c, l, s)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", M, xdt)
    if c == 1 and h0 is None and not final_state:  # no state enters or leaves the one chunk
        return y_diag.reshape(b, L, H, P)[:, :T], None

    # 2. State each chunk contributes at its end: sum_j exp(a_{j+1..end}) (dt_j x_j) B_j^T.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, H, c, l)
    states = torch.einsum("bcln,bhcl,bclhp->bchpn", B, decay_to_end, xdt)  # (b, c, H, P, N)

    # 3. Across chunks: state at the start of each chunk (and the final one) from all earlier.
    if h0 is None:
        h0 = x.new_zeros(b, H, P, N)
    states = torch.cat([h0[:, None].to(states.dtype), states], dim=1)  # (b, c+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # (b, c+1, H, P, N)
    states, h_final = states[:, :-1], states[:, -1]

    # 4. Contribution of each chunk's start state: C_i exp(a_{start..i}) h_start.
    y_off = torch.einsum("bcln,bchpn,bhcl->bclhp", C, states, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(b, c * L, H, P)[:, :T]  # (B, T, H, P)
    return y, h_final if final_state else None


def ssd_chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    h0: Tensor | None = None,
    final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """`ssd_chunk_scan_ref`, on mamba-ssm's fused kernel when on CUDA with mamba-ssm installed."""
    if HAS_MAMBA_SSM and x.is_cuda:
        y, h_final = mamba_chunk_scan_combined(
            x,
            dt,
            A,
            B[:, :, None],
            C[:, :, None],
            chunk_size,  # B, C: (B, T, 1, N)
            initial_states=h0,
            return_final_states=True,
        )
        return y, h_final if final_state else None
    return ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, h0, final_state)


def ssd_step_ref(
    h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """One SSD recurrence step, functional (differentiable), without the D skip.

    h: (B, H, P, N); x: (B, H, P); dt: (B, H) after softplus; A: (H,); B, C: (B, N).
    Returns y: (B, H, P) and the new state (B, H, P, N).
    """
    dA = torch.exp(dt * A)  # (B, H)
    dxB = x[..., None] * (dt[..., None] * B[:, None, :])[:, :, None, :]  # (B, H, P, N)
    h = dA[..., None, None] * h + dxB
    y = torch.einsum("bhpn,bn->bhp", h, C)
    return y, h


def ssd_step_(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """`ssd_step_ref` that updates `h` in place and returns y: (B, H, P).

    At imagination batch sizes h is larger than the cache (16 MiB a layer at B=1024), so a fresh
    tensor per step costs 1.7-2.6x; y is computed from the old state,
    y = exp(dt A) (h_old C) + dt (C . B) x, so h is read once before it is overwritten.
    """
    if HAS_MAMBA_SSM and x.is_cuda:
        H, P = x.shape[1:]
        return selective_state_update(
            h,
            x,
            dt[..., None].expand(-1, -1, P),
            A[:, None, None].expand(H, P, B.shape[-1]),
            B[:, None],
            C[:, None],  # (B, 1, N)
        )
    dA = torch.exp(dt * A)  # (B, H)
    dtB = dt[..., None] * B[:, None, :]  # (B, H, N)
    CB = (C * B).sum(-1, keepdim=True)  # (B, 1)
    skip = (dt * CB)[..., None] * x  # (B, H, P): the new token's own term
    if torch.compiler.is_compiling():
        # exp(dt A) (h C) as h (exp(dt A) C): C per head gives the reduction the update's loops
        # over (B, H, P), so inductor runs both in one pass over h (1.4 against 1.8-2.6 ms a
        # layer at B=1024, 1 thread: with C per row it read h twice, in two kernels). The
        # update is one expression: a single read-modify-write (2.4x faster than tracing the
        # two in-place ops below).
        y = (h * (dA[..., None] * C[:, None, :])[:, :, None, :]).sum(-1) + skip
        h.copy_(dA[..., None, None] * h + x[..., None] * dtB[:, :, None, :])
        return y
    # h C as a product and a sum over N, not a matmul: the matmul is B*H products of (P, N) by
    # (N, 1), which CPU batched GEMM runs slowly (eager step 1.9-2.3x faster at 64-256 rows,
    # 1.2x at 1024).
    y = dA[..., None] * (h * C[:, None, None, :]).sum(-1) + skip
    # Eager: no (B, H, P, N) temporary; decay, then the rank-1 update of each head as one
    # broadcast multiply-add (faster than a batched matmul of (P, 1) by (1, N) products).
    h.mul_(dA[..., None, None]).addcmul_(x[..., None], dtB[:, :, None, :])
    return y


def branch_kernels(u: Tensor, states: Sequence[Mamba2Branches],
                    matmul_dtype: torch.dtype | None) -> ModuleType | None:
    """The native kernels if they apply to this branch step: fp32 on the CPU, without autograd
    or a bf16 matmul, on the contiguous buffers they update in place."""
    if matmul_dtype is not None:
        return None
    for state in states:
        if not (state.conv.is_contiguous() and state.path.is_contiguous()
                and state.root.tensor.is_contiguous()):
            return None
    return native.for_imagination(u)


def kept_while_frozen(owner: nn.Module, name: str, params: Sequence[Tensor],
                      make: Callable[[], Any]) -> Any:
    """`make()`, kept on `owner` under `name` between no-grad calls until one of `params`
    changes: keyed on their identity, version, device and dtype, so an optimizer step, a load,
    a move or a cast makes it again. With autograd on it is made afresh (differentiable).

    For tensors that depend on weights alone and that imagination would otherwise rebuild on
    every step (a few small ops each, which at its row counts cost as much as the step's math).
    """
    if torch.is_grad_enabled() or any(p.is_inference() for p in params):
        return make()  # (inference tensors count no versions: nothing to key on)
    key = tuple((id(p), p._version, p.device, p.dtype) for p in params)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = owner.__dict__[name] = (key, make())
    return cached[1]


# --------------------------------------------------------------------------------------------
# torch.compile with a clean fallback
# --------------------------------------------------------------------------------------------


class compiled:  # lower case: used like torch.compile, compiled(fn)(*args)
    """`torch.compile(fn, dynamic=False)` that falls back to eager `fn` if compilation fails.

    Compilation happens lazily on the first call of each new shape; if that raises (no C
    compiler, unsupported platform, a compiler bug), warn once and run `fn` eagerly from then on.
    `dynamic=False` because dynamic-shape recompiles crashed ("double free") in the probe.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.failed = False
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                if self._compiled is None:  # lazily: importing torch._dynamo takes seconds
                    import torch._dynamo

                    if not torch._dynamo.is_dynamo_supported():
                        raise RuntimeError("torch.compile is not supported on this platform")
                    config = torch._dynamo.config
                    config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
                    self._compiled = torch.compile(self.fn, dynamic=False)
                return self._compiled(*args, **kwargs)
            except Exception as err:  # any compiler failure means "use eager"
                self.failed = True
                warnings.warn(
                    f"torch.compile failed ({type(err).__name__}: {err}); running "
                    f"{getattr(self.fn, '__qualname__', self.fn)} eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.fn(*args, **kwargs)


def linear(x: Tensor, weight: Tensor, dtype: torch.dtype | None) -> Tensor:
    """x @ weight^T, optionally with both cast to `dtype` (bf16 matmuls); result in x's dtype."""
    if dtype is None or dtype == x.dtype:
        return F.linear(x, weight)
    return F.linear(x.to(dtype), weight.to(dtype)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------


class Mamba2(nn.Module):
    """Mamba-2 mixer (n_groups = 1): in_proj -> causal conv1d -> SSD -> gated RMSNorm -> out_proj.

    Same parameters and layout as mamba-ssm's `Mamba2` and transformers' `Mamba2Mixer`
    (use_bias=False, conv bias on): in_proj emits [z, x, B, C, dt].
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 32,
        chunk_size: int = 32,
        eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ):
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(
                f"expand * d_model = {self.d_inner} not divisible by headdim {headdim}"
            )
        self.d_state, self.d_conv, self.headdim = d_state, d_conv, headdim
        self.n_heads = self.d_inner // headdim
        self.chunk_size = chunk_size
        self.conv_dim = self.d_inner + 2 * d_state  # conv runs over [x, B, C]

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1
        )
        # dt = softplus(dt_raw + dt_bias) starts log-uniform in [dt_min, dt_max]; A_h = -h.
        log_dt = math.log(dt_min) + torch.rand(self.n_heads) * math.log(dt_max / dt_min)
        dt = log_dt.exp().clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = RMSNormGated(self.d_inner, eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., 2E+2N+H) -> z (..., E), xBC (..., E+2N), dt_raw (..., H)."""
        return zxbcdt.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _ssm_inputs(self, xBC: Tensor, dt_raw: Tensor) -> tuple[Tensor, ...]:
        """Post-conv [x, B, C] and raw dt -> x (..., H, P), dt (..., H), A (H,), B, C (..., N)."""
        x, B, C = xBC.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        x = x.unflatten(-1, (self.n_heads, self.headdim))  # (..., H, P)
        dt = F.softplus(dt_raw + self.dt_bias)
        return x, dt, -torch.exp(self.A_log), B, C

    def forward(
        self, u: Tensor, state: Mamba2State | None = None, conv_weight: Tensor | None = None,
        return_state: bool = True,
    ) -> tuple[Tensor, Mamba2State | None]:
        """Chunked-scan pass over a sequence (training, and prefilling a state for imagination).

        u: (B, T, D); state: where to continue from (None: from zeros); conv_weight:
        `conv_weight()`, which a compiled caller makes outside its graph. Returns y: (B, T, D)
        and the state after the last token (None without `return_state`: training needs y
        alone, and from a zero state a sequence within one chunk then skips the scan's
        state passing).
        """
        T = u.shape[1]
        w = self.conv_weight() if conv_weight is None else conv_weight
        z, xBC, dt_raw = self._split(self.in_proj(u))
        context = None if state is None else state.conv_ordered()
        conv_in = xBC
        xBC = F.silu(causal_conv1d(xBC, w, self.conv1d.bias, context))
        x, dt, A, B, C = self._ssm_inputs(xBC, dt_raw)
        y, h = ssd_chunk_scan(x, dt, A, B, C, self.chunk_size,
                              None if state is None else state.ssm, return_state)
        y = y + self.D[:, None] * x  # (B, T, H, P)
        y = self.norm(y.flatten(-2), z)  # (B, T, E)
        if not return_state:
            return self.out_proj(y), None

        t = T if state is None else state.t + T
        if context is None:
            context = conv_in.new_zeros(u.shape[0], self.d_conv - 1, self.conv_dim)
        tail = torch.cat([context, conv_in], dim=1)[:, -(self.d_conv - 1) :]  # (B, K-1, C)
        conv = tail.roll(t % (self.d_conv - 1), dims=1)  # oldest input to ring slot t % (K-1)
        return self.out_proj(y), Mamba2State(conv=conv, ssm=h.contiguous(), t=t)

    def init_state(self, batch: int, device: torch.device | None = None) -> Mamba2State:
        """Zero state for `batch` sequences: conv (B, K-1, C), ssm (B, H, P, N)."""
        device = device or self.A_log.device
        return Mamba2State(
            conv=torch.zeros(batch, self.d_conv - 1, self.conv_dim, device=device),
            ssm=torch.zeros(batch, self.n_heads, self.headdim, self.d_state, device=device),
        )

    def conv_weight(self) -> Tensor:
        """(C, K) depthwise conv weight stored tap-major, so that each tap w[:, k] is contiguous.

        Compiled code vectorises the K shifted multiply-adds over C only if each tap is
        contiguous; conv1d.weight (C, 1, K) has them strided by K (scalar code, ~3x slower for
        the step's conv), and inductor inlines a `.contiguous()` taken inside its graph, so
        compiled callers make this outside the graph and pass it in. Differentiable; without
        autograd it is kept while the weight stays the same (imagination steps call it once
        a token per layer).
        """
        return kept_while_frozen(self, "_conv_weight_cache", (self.conv1d.weight,),
                                 lambda: self.conv1d.weight[:, 0].t().contiguous().t())

    def _conv_step(self, conv: Tensor, slot: int, xBC: Tensor, w: Tensor) -> Tensor:
        """Causal conv output (B, C) for a new input xBC: (B, C), given the ring buffer
        conv: (B, K-1, C) whose oldest entry is at `slot` (not updated here) and the weight
        w: (C, K)."""
        K = self.d_conv
        y = self.conv1d.bias + xBC * w[:, K - 1]
        for k in range(K - 1):  # tap k sees the input K-1-k steps back, in slot + k
            y = y + conv[:, (slot + k) % (K - 1)] * w[:, k]
        return y

    def step_ref(self, state: Mamba2State, u: Tensor) -> tuple[Tensor, Mamba2State]:
        """One token, functional and differentiable. u: (B, D) -> y: (B, D), new state."""
        z, xBC, dt_raw = self._split(self.in_proj(u))
        slot = state.t % (self.d_conv - 1)
        xc = F.silu(self._conv_step(state.conv, slot, xBC, self.conv1d.weight[:, 0]))
        conv = state.conv.clone()
        conv[:, slot] = xBC  # newest input replaces the oldest
        x, dt, A, B, C = self._ssm_inputs(xc, dt_raw)
        y, h = ssd_step_ref(state.ssm, x, dt, A, B, C)
        y = y + self.D[:, None] * x  # (B, H, P)
        y = self.norm(y.flatten(-2), z)  # (B, E)
        return self.out_proj(y), Mamba2State(conv=conv, ssm=h, t=state.t + 1)

    def _branch_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """What `step_branches` derives from the weights, kept while they do not change: A (H,),
        the conv taps that multiply each ring slot, for each position of the oldest one
        (K-1, K-1, C), and the tap of the newest input (C,)."""
        def make() -> tuple[Tensor, Tensor, Tensor]:
            w = self.conv1d.weight[:, 0]  # (C, K)
            K = self.d_conv
            # ring slot j holds the input K-1-k steps back, tap k, where k = (j - oldest) % (K-1)
            taps = torch.stack([
                torch.stack([w[:, (j - oldest) % (K - 1)] for j in range(K - 1)])
                for oldest in range(K - 1)
            ])
            return -torch.exp(self.A_log), taps, w[:, K - 1].contiguous()

        return kept_while_frozen(self, "_branch_weights_cache",
                                 (self.A_log, self.conv1d.weight), make)

    def step_branches(
        self, state: Mamba2Branches, u: Tensor, matmul_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Mamba2Branches]:
        """One token on each branch (`Mamba2Branches`): u (M, D) -> y (M, D) and the state with
        the token appended to every path (the conv ring is updated in place, as in `step_`).

        Imagination steps a few dozen to a few hundred rows at a time, where each op's fixed
        cost outweighs its arithmetic, so this is written in as few ops as it can be: weight
        derivatives kept (`_branch_weights`), the conv as one product with the taps of the
        ring's current order, D folded into the newest token's weight, updates in place. Where
        lwm's native kernels apply (`lwm.models.native`: fp32 on the CPU, no bf16 projections)
        the whole step is one native call, to which this PyTorch path is the reference.
        """
        slot = state.t % (self.d_conv - 1)
        kernels = branch_kernels(u, (state,), matmul_dtype)
        if kernels is not None:
            path = state.room()
            y = kernels.mamba2_branch_step(u.contiguous(), *self.native_weights(), self.norm.eps,
                                           state.conv, path, state.root.tensor, state.origin,
                                           state.tokens, slot)
            return y, state.advanced(path)
        E, N, H = self.d_inner, self.d_state, self.n_heads
        A, taps, newest = self._branch_weights()
        z, xBC, dt_raw = self._split(linear(u, self.in_proj.weight, matmul_dtype))
        xc = (state.conv * taps[slot]).sum(1).addcmul_(xBC, newest).add_(self.conv1d.bias)
        state.conv[:, slot] = xBC  # the newest input replaces the oldest
        xBC = F.silu(xc, inplace=True)
        dt = F.softplus(dt_raw + self.dt_bias)  # (M, H)
        L = dt * A  # (M, H): a_s, then L_s
        s = state.tokens
        if s:
            L += state.path[:, s - 1, -H:]
        token = torch.cat([xBC[:, : E + N], dt, L], dim=-1)  # packed as `Mamba2Branches.path`
        path = state.room()[:, : s + 1]  # (M, s + 1, F): no copy where `take` left room
        path[:, s] = token
        xs, Bs, dts, Ls = state.parts(path)
        C = xBC[:, E + N :]  # (M, N)
        # Products and sums, not bmm / einsum: those run these tiny per-branch contractions
        # 5-9x slower on CPU (measured at 40-400 branches, paths of 2-7 tokens, 1 thread).
        CB = (Bs * C[:, None]).sum(-1, keepdim=True)  # (M, s, 1)
        weight = (L[:, None] - Ls).exp_().mul_(dts).mul_(CB)  # (M, s, H)
        weight[:, -1] += self.D  # the skip D x_s rides on the newest token's weight, exp(0) dt CB
        y = (weight[..., None] * xs).sum(1)  # (M, H, P)
        y = y.addcmul_(L.exp()[..., None], state.root_read(C))
        y = self.norm(y.flatten(-2), z)  # (M, E)
        return linear(y, self.out_proj.weight, matmul_dtype), state.advanced(path)

    def native_weights(self) -> list[Tensor]:
        """The weights `native.cpp`'s `mamba2_branch_step` takes, in its order."""
        return [self.in_proj.weight, self.conv1d.weight, self.conv1d.bias, self.dt_bias,
                self.A_log, self.D, self.norm.weight, self.out_proj.weight]

    def step_(
        self,
        conv: Tensor,
        ssm: Tensor,
        slot: int,
        u: Tensor,
        matmul_dtype: torch.dtype | None = None,
        conv_weight: Tensor | None = None,
    ) -> Tensor:
        """One token, updating a `Mamba2State`'s conv (B, K-1, C) and ssm (B, H, P, N) in place.

        slot: `state.t % (K-1)` (the caller advances `state.t`; a compiled caller specialises on
        the slot, where passing t would recompile every step). u: (B, D) -> y: (B, D).
        `matmul_dtype=torch.bfloat16` runs the two projections in bf16; the scan stays fp32.
        conv_weight: `conv_weight()`, made here if None. No autograd through the in-place update:
        this is the no-grad imagination path.
        """
        z, xBC, dt_raw = self._split(linear(u, self.in_proj.weight, matmul_dtype))
        w = self.conv_weight() if conv_weight is None else conv_weight
        xc = F.silu(self._conv_step(conv, slot, xBC, w))
        conv[:, slot] = xBC
        x, dt, A, B, C = self._ssm_inputs(xc, dt_raw)
        y = ssd_step_(ssm, x, dt, A, B, C) + self.D[:, None] * x  # (B, H, P)
        y = self.norm(y.flatten(-2), z)  # (B, E)
        return linear(y, self.out_proj.weight, matmul_dtype)
