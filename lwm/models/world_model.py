"""The world model: encode observations, step a sequence backbone, predict what comes next.

    z_t   = encode(o_t)                   observation (7x7 symbolic view, direction, carrying)
    h_t   = next(state, z_t, a_t-1)       backbone step on the token (z_t, the action that led
                                          to o_t; `START` before the first action): the history
                                          through o_t
    ô_t+1 = decode(h_t, a_t)              logits of the next view: per-cell type/colour/state,
                                          direction, carried type/colour
    r     = reward(h_t, a_t, g)           logit: goal g (a 384-d embedding) becomes achieved on
                                          arriving at o_t+1
    c     = cont(h_t, a_t)                logit: the episode goes on after o_t+1
    Q     = q(h_t, g)                     (A,) logits of the discounted chance of achieving g when
                                          taking each action now and acting greedily after
    v     = value(h_t, g)                 max_a Q: the goal-reaching value of the history

Q is learned by TD on relabelled goals (DQN with hindsight inside the world model): it is the
planner's terminal bootstrap and, greedily, a fast policy on its own. Imagination feeds the most
likely decoded observation back through `encode`, so imagined futures are grids that can be
shown, scored and compared with real ones. An optional ensemble of decoder heads measures
uncertainty by disagreement. The `ego` decoder adds to each next-view cell what the current view
holds where that cell comes from under the action (`ego_sources`), gated per cell, so it copies
what stays in view and only has to predict what comes into it. The `map` decoder copies the same
way from a memory of every cell seen so far: an egocentric map carried in the recurrent state
(`MapState`), moved under each action by dead reckoning (`map_moves`) and overwritten by each
observation, so cells that left the view come back as they were.

Tensors only: goal embeddings and observations arrive as tensors; this module knows neither the
language layer nor the environments.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lwm.models import native
from lwm.models.backbones import BackboneConfig, make_backbone
from lwm.models.ssm import BatchState, kept_while_frozen

N_TYPES, N_COLORS, N_STATES = 11, 6, 3
"""minigrid's object types, colours and door states."""
N_DIRECTIONS = 4
VIEW = 7
N_CELLS = VIEW * VIEW
CELL_LOGITS = N_TYPES + N_COLORS + N_STATES
OBS_LOGITS = N_CELLS * CELL_LOGITS + N_DIRECTIONS + N_TYPES + N_COLORS
MAP_CELLS = N_CELLS + 1
"""Cells a goal-match map scores: the 7x7 view and the carried object."""
DECODERS = ("mlp", "ego", "map")
"""Decoder kinds: "mlp" predicts the next view from the history alone; "ego" adds, per cell, a
gated read of the current view's cell it comes from (`ego_sources`); "map" reads it from a map
of everything seen so far (`map_moves`)."""
LEFT, RIGHT, FORWARD = 0, 1, 2
"""minigrid's turn and move actions (the other actions leave the view where it is)."""
MAP_RADIUS = 7
"""The map decoder remembers cells up to this many steps from the agent along each axis (a 15 x
15 map): a whole 8 x 8 BabyAI room from anywhere in it. What falls off the edge is forgotten."""
MAP_SIDE = 2 * MAP_RADIUS + 1
MAP_SIZE = MAP_SIDE * MAP_SIDE
CELL_IDS = N_TYPES * N_COLORS * N_STATES
"""Packed cell ids, (type * 6 + colour) * 3 + state (`pack_cells`); 0 is an unseen cell, which
on the map means a cell never seen."""
FRONT, AGENT = 3 * VIEW + 5, 3 * VIEW + 6
"""The view cells in front of the agent and under it, x * 7 + y."""
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "lwm-world-model"


def ego_sources(n_actions: int = 7) -> Tensor:
    """(n_actions, 2, N_CELLS) int64: for each action and next-view cell x * 7 + y, the cell of
    the current view that it shows, if the pose stays (source 0) or if a forward move succeeds
    (source 1); N_CELLS where none does.

    minigrid's egocentric view puts the agent at (3, 6) facing towards y = 0. A turn rotates the
    view about the agent: after a left turn, cell (x, y) shows what (y - 3, 9 - x) showed, after
    a right turn (9 - y, 3 + x), where that lies in the view. A forward move shifts it by a row,
    (x, y) showing (x, y - 1), unless the move is blocked; every other action leaves the pose,
    and (x, y) shows (x, y) (the cell in front may change). Tested against real BabyAI episodes.
    """
    src = torch.full((n_actions, 2, VIEW, VIEW), N_CELLS, dtype=torch.long)
    index = torch.arange(N_CELLS).view(VIEW, VIEW)  # (x, y) -> x * 7 + y
    src[:, 0] = index  # the pose stays: same cell
    src[LEFT, 0] = N_CELLS
    src[LEFT, 0, 3:, 3:] = index[:4, 3:].flip(1).T  # (x, y) <- (y - 3, 9 - x)
    src[RIGHT, 0] = N_CELLS
    src[RIGHT, 0, :4, 3:] = index[3:, 3:].flip(0).T  # (x, y) <- (9 - y, 3 + x)
    src[FORWARD, 1, :, 1:] = index[:, :-1]  # (x, y) <- (x, y - 1)
    return src.flatten(-2)


def pack_cells(image: Tensor) -> Tensor:
    """image (..., 7, 7, 3) -> (..., 49) int64 packed cell ids (`CELL_IDS`), cell x * 7 + y."""
    image = image.long()
    state = image[..., 2].clamp(max=N_STATES - 1)
    return ((image[..., 0] * N_COLORS + image[..., 1]) * N_STATES + state).flatten(-2)


def map_moves(n_actions: int = 7) -> Tensor:
    """(n_actions + 1, 2, MAP_SIZE) int64: for each previous action (the last row is `START`)
    and whether it moved the agent forward (1) or not (0), the cell of the old map that each
    cell of the new map shows; MAP_SIZE where none does.

    The map is egocentric like minigrid's view: the agent sits at its centre facing towards
    v = 0, and cell (u, v), index u * 15 + v, lies u - 7 cells to the agent's right and 7 - v
    behind it (view cell (x, y) is map cell (x + 4, y + 1)). Turns rotate it about the agent,
    (dx, dy) showing (dy, -dx) after a left turn and (-dy, dx) after a right one (as in
    `ego_sources`); a forward move that succeeds shifts it, (dx, dy) showing (dx, dy - 1).
    """
    r = MAP_RADIUS
    offsets = torch.arange(-r, r + 1)
    dx, dy = torch.meshgrid(offsets, offsets, indexing="ij")

    def at(sx: Tensor, sy: Tensor) -> Tensor:
        inside = (sx.abs() <= r) & (sy.abs() <= r)
        return torch.where(inside, (sx + r) * MAP_SIDE + sy + r, MAP_SIZE).flatten()

    moves = at(dx, dy).repeat(n_actions + 1, 2, 1)
    moves[LEFT] = at(dy, -dx)
    moves[RIGHT] = at(-dy, dx)
    moves[FORWARD, 1] = at(dx, dy - 1)
    return moves


def map_view() -> Tensor:
    """(N_CELLS,) int64: the map cell of each view cell x * 7 + y."""
    x, y = torch.meshgrid(torch.arange(VIEW), torch.arange(VIEW), indexing="ij")
    return ((x - VIEW // 2 + MAP_RADIUS) * MAP_SIDE + y - (VIEW - 1) + MAP_RADIUS).flatten()


def map_sources(n_actions: int = 7) -> Tensor:
    """(n_actions, 2, N_CELLS) int64: like `ego_sources`, but cells of the current map (after
    it took in the current view): for each action and next-view cell, the map cell it shows if
    the pose stays (source 0) or a forward move succeeds (source 1); MAP_SIZE where none."""
    src = map_moves(n_actions)[:n_actions, :, map_view()]
    src[torch.arange(n_actions) != FORWARD, 1] = MAP_SIZE  # only a forward move moves
    return src


def unpack_cells(ids: Tensor) -> Tensor:
    """Packed cell ids (...) -> (..., 3) type, colour, state (the inverse of `pack_cells`)."""
    return torch.stack([ids // (N_COLORS * N_STATES), ids // N_STATES % N_COLORS,
                        ids % N_STATES], -1)


ENTERABLE_TYPES, DOOR, OPEN = (1, 3, 8, 9), 4, 0
"""minigrid's empty cell, floor, goal and lava, which the agent can step into, as it can into a
door whose state is open (the rule of `lwm.envs.spatial.enterable`, on type ids)."""


def enterable_cells(cells: Tensor) -> Tensor:
    """cells (..., 3) type, colour, state -> (...) bool: whether the agent can step into each."""
    kind, state = cells[..., 0], cells[..., 2]
    return torch.isin(kind, torch.tensor(ENTERABLE_TYPES)) | ((kind == DOOR) & (state == OPEN))


@dataclass
class MapState(BatchState):
    """Recurrent state of a world model with the map decoder: the backbone's, and the map.

    grid: (B, MAP_SIZE) int64 packed cell ids (`pack_cells`) of the egocentric map, 0 where
    never seen. front_open: (B,) bool, whether the agent could step into the cell in front of it
    in the last observation (the next forward move succeeds).
    """

    backbone: BatchState
    grid: Tensor
    front_open: Tensor


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, foreign, or does not match the expected config."""


@dataclass
class WorldModelConfig:
    """Sizes of the world model; presets in `PRESETS` ("debug", "small", "base")."""

    backbone: str = "mamba2"
    """Sequence backbone: "mamba2", "gru" or "transformer"."""
    backbone_cfg: BackboneConfig = field(default_factory=BackboneConfig)
    """Backbone sizes; its d_model is the latent width of the whole model."""
    cell_dim: int = 16
    """Embedding width of one grid cell (type + colour + state embeddings, summed)."""
    hidden: int = 256
    """Hidden width of the decoder and the reward / value / continuation heads."""
    goal_dim: int = 384
    """Width of goal embeddings (all-MiniLM-L6-v2 gives 384)."""
    n_actions: int = 7
    """Discrete actions (minigrid has 7)."""
    ensemble: int = 1
    """Decoder heads; > 1 gives an uncertainty estimate from their disagreement."""
    discount: float = 0.9
    """gamma of Q: the value of achieving a goal k steps from now is gamma**k."""
    target_ema: float = 0.98
    """Polyak factor of the target Q head used for TD targets."""
    double_q: bool = True
    """Double DQN targets: the online Q head picks the next action, the target head values it."""
    goal_maps: int = 0
    """Goal-match maps of the reward and Q heads (0: two-stream heads on the history alone)."""
    decoder: str = "mlp"
    """Next-view decoder (`DECODERS`): "mlp", "ego" (gated copies of the current view's cells
    along the action's view shift, plus the MLP's prediction) or "map" (the same copies from
    the map of every cell seen so far)."""

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose from {DECODERS}")

    @property
    def carries_cells(self) -> bool:
        """Whether h carries the current view's cell embeddings (the goal maps and the ego
        decoder read them)."""
        return self.goal_maps > 0 or self.decoder == "ego"

    @property
    def copies(self) -> bool:
        """Whether the decoder adds gated copies of known cells (the ego and map decoders)."""
        return self.decoder in ("ego", "map")

    @property
    def d_model(self) -> int:
        return self.backbone_cfg.d_model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldModelConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"unknown world-model config fields {sorted(unknown)}")
        bb = data.pop("backbone_cfg", {})
        bb_known = {f.name for f in dataclasses.fields(BackboneConfig)}
        if set(bb) - bb_known:
            raise CheckpointError(f"unknown backbone config fields {sorted(set(bb) - bb_known)}")
        return cls(backbone_cfg=BackboneConfig(**bb), **data)


PRESETS: dict[str, WorldModelConfig] = {
    "debug": WorldModelConfig(
        backbone_cfg=BackboneConfig(
            d_model=32, n_layers=1, d_state=8, headdim=16, n_heads=2, chunk_size=8
        ),
        cell_dim=4,
        hidden=64,
        goal_maps=2,
    ),
    "small": WorldModelConfig(goal_maps=8),
    "base": WorldModelConfig(
        backbone_cfg=BackboneConfig(d_model=256, n_layers=4, headdim=64, n_heads=8),
        cell_dim=32,
        hidden=512,
        ensemble=4,
        goal_maps=8,
    ),
}
"""Named sizes: `debug` shrinks everything (tests use it), `small` is the CPU default."""


def preset(name: str, **overrides: Any) -> WorldModelConfig:
    """A copy of preset `name` with top-level fields replaced (backbone="gru", ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown world-model preset {name!r}; choose from {sorted(PRESETS)}")
    base = PRESETS[name]
    cfg = dataclasses.replace(base, backbone_cfg=dataclasses.replace(base.backbone_cfg))
    return dataclasses.replace(cfg, **overrides)


class _GoalHead(nn.Module):
    """n_out logits(h, g) = <phi_i(h), psi(g)> / sqrt(k) + bias_i(g): a two-stream (UVFA) head,
    plus, with `maps` > 0, goal-match maps of the current view.

    The goal stream depends on the goal alone, so a batch scores many goals per state at the
    cost of one dot product each: compute `goal_features` of a goal table once and pass `psi`.

    Goal-match maps: the goal also gives `maps` query vectors (and biases); every cell of the
    current view, and the carried object, is scored against each query (a dot product of its
    cell embedding with the query), and an MLP reads the maps together with the history. "Go to
    the red ball" is an AND of colour and type at one cell, which a product of goal and cell
    features states directly, while the two-stream part has to find it in a d-wide history that
    holds every object at once. The cell embeddings ride along in h (see `WorldModel.encode`), so
    the head needs nothing but h, and the maps of G goals share one set of cell embeddings.
    """

    def __init__(self, d: int, goal_dim: int, hidden: int, n_out: int = 1, maps: int = 0,
                 cell_dim: int = 0, map_hidden: int = 64):
        super().__init__()
        self.d, self.hidden, self.n_out = d, hidden, n_out
        self.maps, self.cell_dim = maps, cell_dim
        self.state_mlp = nn.Sequential(
            nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden * n_out)
        )
        self.goal_mlp = nn.Sequential(
            nn.Linear(goal_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden + n_out)
        )
        # Goals are rarely achieved: start near p = 0.05 rather than 0.5, so TD does not have to
        # unlearn an optimistic start goal by goal.
        with torch.no_grad():
            self.goal_mlp[-1].bias[hidden:] = -3.0
        if maps:
            self.query = nn.Linear(goal_dim, maps * (cell_dim + 1))
            self.read = nn.Linear(MAP_CELLS * maps, map_hidden)
            self.history = nn.Linear(d, map_hidden)
            self.map_out = nn.Sequential(nn.SiLU(), nn.Linear(map_hidden, n_out))

    def goal_features(self, g: Tensor) -> Tensor:
        """g (..., goal_dim) -> psi (..., k + n_out [+ maps * (cell_dim + 1)]): the goal stream,
        per-output biases and the map queries."""
        psi = self.goal_mlp(g)
        return torch.cat([psi, self.query(g)], dim=-1) if self.maps else psi

    def forward(self, h: Tensor, g: Tensor | None = None, psi: Tensor | None = None,
                core: Tensor | None = None) -> Tensor:
        """h (..., D) and g (..., goal_dim) or psi (..., P), broadcastable -> logits (..., n_out).
        core: what the head reads in place of h's first d entries (the history with an action
        added, `WorldModel.reward`), so that h's cells need not be copied beside it."""
        psi = self.goal_features(g) if psi is None else psi
        k, n = self.hidden, self.n_out
        core = h[..., : self.d] if core is None else core
        phi = self.state_mlp(core).unflatten(-1, (n, k))  # (..., n_out, k)
        dot = (phi * psi[..., None, :k]).sum(-1)  # (..., n_out)
        out = dot / math.sqrt(k) + psi[..., k : k + n]
        if self.maps:
            cells = h[..., self.d : self.d + MAP_CELLS * self.cell_dim].unflatten(
                -1, (MAP_CELLS, self.cell_dim))  # (..., C, e)
            query = psi[..., k + n :].unflatten(-1, (self.maps, self.cell_dim + 1))
            match = cells @ query[..., :-1].transpose(-1, -2) + query[..., None, :, -1]
            out = out + self.map_out(self.read(match.flatten(-2)) + self.history(core))
        return out

    def fold(self, psi: Tensor) -> GoalFold:
        """This head with goals psi (B, P) (`goal_features`) folded into its weights: what
        depends on the goal alone is multiplied out once, so scoring many states for their
        goal skips the widest matmul (`GoalFold`)."""
        k, n, e = self.hidden, self.n_out, self.cell_dim
        stream = psi[:, :k]  # (B, k)
        last = self.state_mlp[2]  # phi = last(u): (n * k) outputs, output i * k + j
        out = torch.einsum("ijl,bj->bil", last.weight.view(n, k, k), stream) / math.sqrt(k)
        bias = (stream @ last.bias.view(n, k).T) / math.sqrt(k) + psi[:, k : k + n]
        read = read_bias = None
        if self.maps:
            query = psi[:, k + n :].unflatten(-1, (self.maps, e + 1))  # (B, maps, e + 1)
            weight = self.read.weight.view(-1, MAP_CELLS, self.maps)  # (hidden, C, maps)
            read = torch.einsum("jcm,bme->bjce", weight, query[..., :-1]).flatten(-2)
            read_bias = query[..., -1] @ weight.sum(1).T + self.read.bias  # (B, hidden)
        return GoalFold(self, out, bias, read, read_bias)

    def pairwise(self, h: Tensor, psi: Tensor, goals: Tensor | None = None) -> Tensor:
        """Every state against its own set of goals: h (B, L, D) and psi (B, L, G, P), or a goal
        table's psi (V, P) with goals (B, L, G) indices into it -> logits (B, L, G, n_out), as
        batched matmuls over the B*L states: no (B, L, G, n_out, k) intermediate, and the cells
        of a state are never copied once per goal.

        With a table, each part of psi (goal stream, biases, map queries) is gathered on its
        own: the gathered parts come out contiguous, and the backward accumulates into the small
        table rather than filling a (B, L, G, P) gradient once per part (training's case)."""
        k, n, e = self.hidden, self.n_out, self.cell_dim
        stream, bias = psi[..., :k], psi[..., k : k + n]
        query = psi[..., k + n :].unflatten(-1, (self.maps, e + 1)) if self.maps else None
        if query is not None:
            query, query_bias = query[..., :-1].flatten(-2), query[..., -1]  # maps * e, maps
        if goals is not None:
            # F.embedding, not table[goals]: its backward accumulates into the table ~2.5x faster
            # on CPU than indexing's index_put (measured at 8 x 64 x 16 slots of a 320-goal table).
            stream, bias = F.embedding(goals, stream), F.embedding(goals, bias)
            if query is not None:
                query, query_bias = F.embedding(goals, query), F.embedding(goals, query_bias)
        phi = self.state_mlp(h[..., : self.d]).unflatten(-1, (n, k))  # (B, L, n_out, k)
        # (phi psi^T)^T rather than psi phi^T: the same product, with faster backward kernels.
        dot = (phi @ stream.transpose(-1, -2)).transpose(-1, -2)  # (B, L, G, n_out)
        out = dot / math.sqrt(k) + bias
        if query is not None:
            *lead, n_goals, _ = query.shape
            cells = h[..., self.d : self.d + MAP_CELLS * e].unflatten(-1, (MAP_CELLS, e))
            # The maps come out goal-major, (B, L, G * maps, C), so the read is one matmul
            # over a view; the read weight (hidden, C, maps) is permuted to match (it is small).
            match = query.reshape(*lead, n_goals * self.maps, e) @ cells.transpose(-1, -2)
            weight = self.read.weight.view(-1, MAP_CELLS, self.maps)
            read = F.linear(match.view(*lead, n_goals, -1),
                            weight.transpose(1, 2).reshape(weight.shape[0], -1))
            # read(match + bias): the query biases enter through the weight summed over cells.
            read = read + query_bias @ weight.sum(1).T + self.read.bias
            out = out + self.map_out(read + self.history(h[..., : self.d])[:, :, None])
        return out


@dataclass
class GoalFold:
    """A `_GoalHead` with B goals folded into its weights (`_GoalHead.fold`).

    The head's logit i is <phi_i(h), s> / sqrt(k) + b_i with phi = W2 u + b2 and u the state
    MLP's hidden layer, so it equals u . (W2_i^T s) / sqrt(k) + const: per goal the widest
    matmul (k by n_out k) becomes n_out dot products. The goal-match maps fold the same way:
    the map read is linear in the matches, which are linear in the cells, so the query and the
    read weight become one (hidden, cells) weight per goal. Equal to the head up to rounding.
    """

    head: _GoalHead
    out: Tensor
    """(B, n_out, k) each goal's stream through the state MLP's last layer, over sqrt(k)."""
    bias: Tensor
    """(B, n_out) each goal's constant: the last layer's bias against its stream, plus b_i."""
    read: Tensor | None
    """(B, map hidden, MAP_CELLS * cell_dim) with maps: each goal's query times the read."""
    read_bias: Tensor | None
    """(B, map hidden) with maps: the query biases through the read, and its bias."""

    def __call__(self, h: Tensor, env: Tensor, core: Tensor | None = None) -> Tensor:
        """h (M, D) (with maps: its cells after the first d entries), env (M,) each row's goal
        index, core (M, d) what replaces h's first d entries (`_GoalHead.forward`) -> (M,
        n_out) logits."""
        if len(self.out) == 1:
            return self._logits(h, 0, h[:, : self.head.d] if core is None else core)
        logits = h.new_empty(len(h), self.head.n_out)
        for b in torch.unique(env).tolist():  # one goal at a time: each its own weights
            rows = (env == b).nonzero()[:, 0]
            logits[rows] = self._logits(h[rows], b, (h[rows, : self.head.d] if core is None
                                                      else core[rows]))
        return logits

    def _logits(self, h: Tensor, b: int, core: Tensor) -> Tensor:
        head = self.head
        u = head.state_mlp[1](head.state_mlp[0](core))  # (M, k)
        out = F.linear(u, self.out[b], self.bias[b])
        if self.read is not None:
            cells = h[:, head.d : head.d + MAP_CELLS * head.cell_dim]
            read = F.linear(cells, self.read[b], self.read_bias[b])
            out = out + head.map_out(read + head.history(core))
        return out


def _gated_copy(table: Tensor, rows: Tensor, gates: Tensor) -> Tensor:
    """The copy decoders' term: for each next-view cell, its two sources' rows of `table`
    (R, 20) summed with weights sigmoid(gate). rows, gates: (M, 2 * 49), source-major (the
    decoder's gate layout) -> (M, 49, 20).

    Without autograd (imagination) one embedding bag per cell gathers, weights and sums its
    two rows: 1.6-2.5x faster than gathering all rows, weighting and summing them (measured at
    128-512 rows, 1 and 2 threads). Training keeps the gather, whose backward is the fast one.
    """
    weight = torch.sigmoid(gates)
    if torch.is_grad_enabled():
        copied = table.index_select(0, rows.reshape(-1))  # (M * 98, 20)
        return (weight.reshape(-1, 1) * copied).view(-1, 2, N_CELLS, CELL_LOGITS).sum(1)
    bags = rows.view(-1, 2, N_CELLS).transpose(1, 2).reshape(-1, 2)  # (M * 49, 2) per cell
    weight = weight.view(-1, 2, N_CELLS).transpose(1, 2).reshape(-1, 2)
    return F.embedding_bag(bags, table, per_sample_weights=weight, mode="sum").view(
        -1, N_CELLS, CELL_LOGITS)


class WorldModel(nn.Module):
    """See the module docstring. Observations are dicts of tensors:

    image (..., 7, 7, 3) int, direction (...) int, carrying (..., 2) int.
    """

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.d_model, cfg.cell_dim
        self.type_emb = nn.Embedding(N_TYPES, e)
        self.color_emb = nn.Embedding(N_COLORS, e)
        self.state_emb = nn.Embedding(N_STATES, e)
        self.cell_proj = nn.Linear(N_CELLS * e, d)
        self.dir_emb = nn.Embedding(N_DIRECTIONS, d)
        self.carry_type_emb = nn.Embedding(N_TYPES, d)
        self.carry_color_emb = nn.Embedding(N_COLORS, d)
        self.z_norm = nn.LayerNorm(d)
        # where `predict_latent`'s bag holds each view position's cells (CELL_IDS rows each),
        # then the direction, carried type and colour rows
        self.register_buffer("_bag_offsets", torch.cat([
            torch.arange(N_CELLS) * CELL_IDS,
            N_CELLS * CELL_IDS + torch.tensor([0, N_DIRECTIONS, N_DIRECTIONS + N_TYPES]),
        ]), persistent=False)
        self.prev_action_emb = nn.Embedding(cfg.n_actions + 1, d)  # + START
        self.backbone = make_backbone(cfg.backbone, cfg.backbone_cfg)
        self.action_emb = nn.Embedding(cfg.n_actions, d)
        out = OBS_LOGITS + (2 * N_CELLS if cfg.copies else 0)  # + a gate per cell and source
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.Linear(d, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, out))
            for _ in range(cfg.ensemble)
        )
        if cfg.copies:  # reads a cell embedding as cell logits, shared by all cells and heads
            self.cell_read = nn.Sequential(
                nn.Linear(e, 2 * e), nn.SiLU(), nn.Linear(2 * e, CELL_LOGITS)
            )
        # every packed cell id's (type, colour, state), for tables over all ids
        self.register_buffer("cell_parts", unpack_cells(torch.arange(CELL_IDS)), persistent=False)
        if cfg.decoder == "ego":
            self.register_buffer("ego_sources", ego_sources(cfg.n_actions).flatten(-2),
                                 persistent=False)
        if cfg.decoder == "map":
            self.register_buffer("map_moves", map_moves(cfg.n_actions), persistent=False)
            self.register_buffer("map_view", map_view(), persistent=False)
            self.register_buffer("map_sources", map_sources(cfg.n_actions).flatten(-2),
                                 persistent=False)
            self.register_buffer("enterable", enterable_cells(self.cell_parts), persistent=False)
        maps = dict(maps=cfg.goal_maps, cell_dim=cfg.cell_dim)
        self.reward_head = _GoalHead(d, cfg.goal_dim, cfg.hidden, **maps)
        self.q_head = _GoalHead(d, cfg.goal_dim, cfg.hidden, n_out=cfg.n_actions, **maps)
        self.cont_head = nn.Sequential(
            nn.Linear(d, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, 1)
        )
        self.q_target = copy.deepcopy(self.q_head).requires_grad_(False)

    @property
    def START(self) -> int:
        """The "previous action" of the first observation of an episode."""
        return self.cfg.n_actions

    # ------------------------------------------------------------------ the math

    @property
    def feature_dim(self) -> int:
        """Width of what the heads read of z and h: d, plus the cell embeddings the goal-match
        maps and the ego decoder read."""
        return self.cfg.d_model + (MAP_CELLS * self.cfg.cell_dim if self.cfg.carries_cells else 0)

    @property
    def latent_dim(self) -> int:
        """Width of h: `feature_dim`, plus the packed cell ids (as floats) the copy decoders
        read: the map's with the map decoder, the current view's with the ego decoder."""
        ids = {"map": MAP_SIZE, "ego": N_CELLS}.get(self.cfg.decoder, 0)
        return self.feature_dim + ids

    def encode(self, image: Tensor, direction: Tensor, carrying: Tensor) -> Tensor:
        """image (..., 7, 7, 3), direction (...), carrying (..., 2) -> z (..., feature_dim [+
        49]): the d-wide observation latent, followed (with goal maps or the ego decoder) by the
        embeddings of the 49 cells and the carried object, which `next` passes on into h for
        the goal heads, and (with a copy decoder) the view's packed cell ids, which `next`
        writes into the map (map decoder) or passes on into h (ego decoder)."""
        cells = self._embed_cells(image)  # (..., 7, 7, e)
        z = self.cell_proj(cells.flatten(-3))  # (..., d)
        z = z + self.dir_emb(direction.long())
        z = z + self.carry_type_emb(carrying[..., 0].long())
        z = z + self.carry_color_emb(carrying[..., 1].long())
        z = self.z_norm(F.silu(z))
        parts = [z]
        if self.cfg.carries_cells:
            carrying = carrying.long()
            carried = self.type_emb(carrying[..., 0]) + self.color_emb(carrying[..., 1])
            parts += [cells.flatten(-3), carried]
        if self.cfg.copies:
            parts.append(pack_cells(image).to(z.dtype))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else z

    def _embed_cells(self, cells: Tensor) -> Tensor:
        """cells (..., 3) type, colour, state -> embeddings (..., cell_dim)."""
        cells = cells.long()
        return (self.type_emb(cells[..., 0]) + self.color_emb(cells[..., 1])
                + self.state_emb(cells[..., 2].clamp(max=N_STATES - 1)))

    def token(self, z: Tensor, prev_action: Tensor) -> Tensor:
        """The backbone input for latent z (..., latent_dim) and the action (...) that led to
        it."""
        return z[..., : self.cfg.d_model] + self.prev_action_emb(prev_action.long())

    def _history(self, y: Tensor, z: Tensor, grid: Tensor | None = None) -> Tensor:
        """Backbone output y (..., d) -> h: with goal maps or the ego decoder, the current cells
        ride along; with the ego decoder, their packed ids too; with the map decoder, the map
        after the current view (`grid`)."""
        parts = [y]
        if self.cfg.carries_cells:
            parts.append(z[..., self.cfg.d_model : self.feature_dim])
        if grid is not None:
            parts.append(grid.to(y.dtype))
        elif self.cfg.decoder == "ego":
            parts.append(z[..., self.feature_dim :])
        return torch.cat(parts, dim=-1) if len(parts) > 1 else y

    def _remember(self, grid: Tensor, front_open: Tensor, prev_action: Tensor,
                  z: Tensor) -> tuple[Tensor, Tensor]:
        """One step of the map: move the map (B, MAP_SIZE) by prev_action (B,) (a forward move
        succeeds where the last view's front cell was open), then write the cells of the new
        view that z (B, ...) shows. Unseen cells keep what the map remembers, and so does the
        agent's own cell: the view shows what the agent carries there, the map what it stepped
        onto. Returns the new map and its front_open."""
        kernels = native.kernels() if grid.device.type == "cpu" else None
        if kernels is not None and z.dtype == torch.float32 and z.dim() == 2:
            grid, front = kernels.map_remember(
                grid.contiguous(), front_open.contiguous(), prev_action.long().contiguous(),
                z.detach().contiguous(), self.feature_dim, self.map_moves, self.map_view,
                self.enterable, FORWARD, AGENT, FRONT)
            return grid, front
        view = z[..., self.feature_dim :].long()  # (B, 49) packed ids
        moved = (prev_action.long() == FORWARD) & front_open
        src = self.map_moves[prev_action.long(), moved.long()]  # (B, MAP_SIZE)
        grid = F.pad(grid, (0, 1)).gather(1, src)  # column MAP_SIZE: never seen
        seen = view > 0
        seen[:, AGENT] = False
        grid[:, self.map_view] = torch.where(seen, view, grid[:, self.map_view])
        return grid, self.enterable[view[:, FRONT]]

    def sequence(self, z: Tensor, prev_action: Tensor) -> Tensor:
        """Teacher-forced pass: z (B, T, ...) (`encode`), prev_action (B, T) -> h (B, T,
        latent_dim). With the map decoder, the map starts empty at the first step."""
        y = self.backbone(self.token(z, prev_action))
        if self.cfg.decoder != "map":
            return self._history(y, z)
        (grid, front), grids = self._empty_map(z.shape[0]), []
        for t in range(z.shape[1]):
            grid, front = self._remember(grid, front, prev_action[:, t], z[:, t])
            grids.append(grid)
        return self._history(y, z, torch.stack(grids, 1))

    def init_state(self, batch: int) -> BatchState:
        """The recurrent state before the first observation: the backbone's (and an empty map,
        `MapState`, with the map decoder)."""
        state = self.backbone.init_state(batch)
        return MapState(state, *self._empty_map(batch)) if self.cfg.decoder == "map" else state

    def _empty_map(self, batch: int) -> tuple[Tensor, Tensor]:
        """A map that has seen nothing (B, MAP_SIZE), and front_open (B,) all False."""
        device = self.cell_parts.device
        return (torch.zeros(batch, MAP_SIZE, dtype=torch.long, device=device),
                torch.zeros(batch, dtype=torch.bool, device=device))

    def branch(self, state: BatchState) -> BatchState:
        """A copy of `state` to imagine many short branches from: `index` or `expand` it, then
        step it with `next` (`Backbone.branch`; the map, if any, is copied)."""
        if self.cfg.decoder != "map":
            return self.backbone.branch(state)
        return MapState(self.backbone.branch(state.backbone), state.grid.clone(),
                        state.front_open.clone())

    def next(self, state: BatchState, z: Tensor, prev_action: Tensor) -> tuple[Tensor, BatchState]:
        """Take in observation latent z (B, ...) (`encode`) reached by prev_action (B,) (`START`
        at reset) -> h (B, latent_dim), the history through it, and the state after it.

        The state may be updated in place (see `Backbone.step`): clone one you want to keep.
        """
        if self.cfg.decoder != "map":
            y, state = self.backbone.step(state, self.token(z, prev_action))
            return self._history(y, z), state
        y, inner = self.backbone.step(state.backbone, self.token(z, prev_action))
        grid, front = self._remember(state.grid, state.front_open, prev_action, z)
        return self._history(y, z, grid), MapState(inner, grid, front)

    def with_action(self, h: Tensor, action: Tensor) -> Tensor:
        """h (..., latent_dim) and the action about to be taken (...) -> the features of the
        pair (the action is added to the d-wide history; cell embeddings pass unchanged)."""
        d = self.cfg.d_model
        core = self._core(h, action)
        if h.shape[-1] == d or self.feature_dim == d:  # no cells to carry along
            return core
        cells = h[..., d : self.feature_dim]
        return torch.cat([core, cells.expand(*core.shape[:-1], -1)], dim=-1)

    def _core(self, h: Tensor, action: Tensor) -> Tensor:
        """The d-wide history h[..., :d] with the action (...) about to be taken added: what
        the decoder, the continuation head and the goal heads' state streams read of a pair."""
        return h[..., : self.cfg.d_model] + self.action_emb(action.long())

    def decode(self, h: Tensor, action: Tensor, head: int = 0) -> dict[str, Tensor]:
        """h (..., latent_dim), action (...) -> logits of the next observation: cells (..., 7, 7,
        20) split into type (11), colour (6), state (3); direction (..., 4); carried type (...,
        11) and colour (..., 6). The MLP decoder reads h's first d entries only (the ego
        decoder also reads the current cells, so h must be whole)."""
        cells, rest = self._decode(h, action, head)
        cells = cells.unflatten(-2, (VIEW, VIEW))
        return {
            "type": cells[..., :N_TYPES],
            "color": cells[..., N_TYPES : N_TYPES + N_COLORS],
            "state": cells[..., N_TYPES + N_COLORS :],
            "direction": rest[..., :N_DIRECTIONS],
            "carry_type": rest[..., N_DIRECTIONS : N_DIRECTIONS + N_TYPES],
            "carry_color": rest[..., N_DIRECTIONS + N_TYPES :],
        }

    def _decode(self, h: Tensor, action: Tensor, head: int = 0) -> tuple[Tensor, Tensor]:
        """`decode`'s logits as two tensors: cells (..., 49, 20) and the rest (..., 21):
        direction, carried type and colour."""
        out = self.decoders[head](self._core(h, action))
        cells = out[..., : N_CELLS * CELL_LOGITS].unflatten(-1, (N_CELLS, CELL_LOGITS))
        if self.cfg.copies:
            cells = cells + self._copy(h, action, out[..., OBS_LOGITS:])
        return cells, out[..., N_CELLS * CELL_LOGITS : OBS_LOGITS]

    def predict_latent(self, h: Tensor, action: Tensor) -> Tensor:
        """h (M, latent_dim), action (M,) -> z (M, ...): the latent of the most likely next
        observation, `encode(**most_likely(decode(h, action)))` (imagination's step, no
        gradient through the argmax), in about half the ops. `cell_proj` is linear in each
        view position's cell embedding, so its product is a sum of rows of a table holding every
        (position, packed cell id)'s projection; the direction and carried object are rows of
        the same table, and one embedding bag sums all 52 (`_latent_tables`). Without autograd
        on the CPU, lwm's native kernels (`lwm.models.native`) run all after the decoder MLP as
        one pass over the rows; this PyTorch path is their reference."""
        kernels = native.for_imagination(h) if h.dim() == 2 else None
        if kernels is not None:
            return self._predict_latent_native(kernels, h, action)
        cells, rest = self._decode(h, action)

        def argmax(logits: Tensor) -> Tensor:
            # max's indices: the same first maximum as argmax, 10-30 % faster over these short
            # rows on CPU (measured at 300 x 49 rows of 3, 6 and 11 logits, 1 thread)
            return logits.max(-1).indices

        t0, t1 = N_TYPES, N_TYPES + N_COLORS
        ids = (argmax(cells[..., :t0]) * N_COLORS + argmax(cells[..., t0:t1])) * N_STATES \
            + argmax(cells[..., t1:])  # (M, 49) packed, as `pack_cells`
        direction = argmax(rest[..., :N_DIRECTIONS])
        carry_type = argmax(rest[..., N_DIRECTIONS : N_DIRECTIONS + N_TYPES])
        carry_color = argmax(rest[..., N_DIRECTIONS + N_TYPES :])
        cell_table, bag, carried_table = self._latent_tables()
        rows = torch.cat([ids, direction[:, None], carry_type[:, None], carry_color[:, None]],
                         dim=-1) + self._bag_offsets  # (M, 52) rows of the bag
        # (M, d): cell_proj(cells) + its bias + the three embeddings. At 128-512 rows this sum
        # of 52 table rows took 28-45 % of the time of the embedding and matmul it replaces
        # (1 and 2 threads).
        z = F.embedding_bag(rows, bag, mode="sum")
        z = self.z_norm(F.silu(z, inplace=True))
        parts = [z]
        if self.cfg.carries_cells:
            embedded = F.embedding(ids, cell_table).flatten(-2)  # (M, 49 e)
            parts += [embedded, F.embedding(carry_type * N_COLORS + carry_color, carried_table)]
        if self.cfg.copies:
            parts.append(ids.to(z.dtype))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else z

    def _predict_latent_native(self, kernels: ModuleType, h: Tensor, action: Tensor) -> Tensor:
        """`predict_latent` as one native call: the decoder MLP in ATen, the rest one pass over
        the rows (`native.cpp`)."""
        cell_table, bag, carried_table = self._latent_tables()
        decoder = self.decoders[0]
        copies, carries = self.cfg.copies, self.cfg.carries_cells
        sources = None
        if copies:
            self._require_ids(h)
            sources = self.map_sources if self.cfg.decoder == "map" else self.ego_sources
        return kernels.predict_latent(
            h.contiguous(), action.long().expand(len(h)).contiguous(), self.action_emb.weight,
            decoder[0].weight, decoder[0].bias, decoder[2].weight, decoder[2].bias,
            [N_TYPES, N_COLORS, N_STATES, N_DIRECTIONS], sources,
            self.feature_dim, self._read_table() if copies else None, bag, self.z_norm.weight,
            self.z_norm.bias, self.z_norm.eps, cell_table if carries else None,
            carried_table if carries else None)

    def _latent_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """`predict_latent`'s tables, kept while the weights stay the same: each packed cell
        id's summed embedding (CELL_IDS, e); the bag (49 CELL_IDS + 4 + 11 + 6, d): for each
        view position, every cell id's embedding through that position's slice of `cell_proj`,
        then the direction rows (with `cell_proj`'s bias), the carried type and colour rows;
        each carried (type, colour)'s summed embedding (N_TYPES * N_COLORS, e)."""
        def make() -> tuple[Tensor, Tensor, Tensor]:
            cells = self._embed_cells(self.cell_parts)  # (CELL_IDS, e)
            weight = self.cell_proj.weight.unflatten(1, (N_CELLS, -1))  # (d, 49, e)
            projected = torch.einsum("ie,dpe->pid", cells, weight).flatten(0, 1)
            bag = torch.cat([projected, self.dir_emb.weight + self.cell_proj.bias,
                             self.carry_type_emb.weight, self.carry_color_emb.weight])
            carried = (self.type_emb.weight[:, None] + self.color_emb.weight[None]).flatten(0, 1)
            return cells, bag, carried

        params = (self.type_emb.weight, self.color_emb.weight, self.state_emb.weight,
                  self.dir_emb.weight, self.carry_type_emb.weight, self.carry_color_emb.weight,
                  self.cell_proj.weight, self.cell_proj.bias)
        return kept_while_frozen(self, "_latent_tables_cache", params, make)

    def _read_table(self) -> Tensor:
        """(CELL_IDS + 1, 20): every packed cell id read as logits (`cell_read` of its
        embedding), and a last row of zeros for "no source". It depends on the weights alone,
        so without autograd (imagination decodes ~20 times a plan) it is kept until one of
        them changes (an optimizer step, a load, a move or cast)."""
        def make() -> Tensor:  # the cells' embeddings are `_latent_tables`' first table
            return F.pad(self.cell_read(self._latent_tables()[0]), (0, 0, 0, 1))

        params = (self.type_emb.weight, self.color_emb.weight, self.state_emb.weight,
                  *self.cell_read.parameters())
        return kept_while_frozen(self, "_read_table_cache", params, make)

    def _require_ids(self, h: Tensor) -> None:
        """Raise unless h (..., W) is whole: a copy decoder reads the ids at its end."""
        if h.shape[-1] != self.latent_dim:
            reads = "the map" if self.cfg.decoder == "map" else "the current cells"
            raise ValueError(f"the {self.cfg.decoder} decoder reads {reads} from h: need h of "
                             f"width {self.latent_dim}, got {h.shape[-1]}")

    def _copy(self, h: Tensor, action: Tensor, gates: Tensor) -> Tensor:
        """The copy decoders' term (..., 49, 20): for each next-view cell and each of its two
        sources under `action` (the pose kept, a forward move made), the cell there read as
        logits (`cell_read`), weighted by sigmoid(gate); gates (..., 2 * 49) come from the
        decoder MLP, which knows whether a move succeeds. The ego decoder's sources are cells of
        the current view (`ego_sources`), the map decoder's cells of the map (`map_sources`);
        h carries their packed ids past `feature_dim`. A cell's read depends on its packed id
        alone, so the copies index the table of every id's read (`_read_table`)."""
        self._require_ids(h)
        sources = self.map_sources if self.cfg.decoder == "map" else self.ego_sources
        lead = torch.broadcast_shapes(h.shape[:-1], action.shape)
        # The column past the ids, no source, holds id CELL_IDS: the table's row of zero logits.
        grid = F.pad(h[..., self.feature_dim :].long(), (0, 1), value=CELL_IDS)
        src = sources[action.expand(lead).long()]  # (*lead, 98)
        ids = grid.expand(*lead, -1).gather(-1, src)
        return _gated_copy(self._read_table(), ids.reshape(-1, 2 * N_CELLS),
                           gates.reshape(-1, 2 * N_CELLS)).view(*lead, N_CELLS, CELL_LOGITS)

    def reward(self, h: Tensor, action: Tensor, g: Tensor | None = None,
               psi: Tensor | None = None) -> Tensor:
        """h (..., d), action (...), goal embeddings g (..., goal_dim) -> logit (...) that the
        action achieves g on arriving at the next observation.

        Pass `psi = model.goal_features(g)["reward"]` instead of g to score the same goals at
        many states without recomputing the goal stream.
        """
        return self.reward_head(h, g, psi, core=self._core(h, action))[..., 0]

    def q(self, h: Tensor, g: Tensor | None = None, psi: Tensor | None = None) -> Tensor:
        """h (..., d), g (..., goal_dim) (or `psi = goal_features(g)["q"]`) -> (..., A) logits of
        the discounted chance of achieving g by taking each action now, greedily after."""
        return self.q_head(h, g, psi)

    def value(self, h: Tensor, g: Tensor | None = None, psi: Tensor | None = None) -> Tensor:
        """max_a Q: h (..., d), g (..., goal_dim) -> logit (...) of the goal-reaching value."""
        return self.q(h, g, psi).amax(-1)

    def fold_goals(self, g: Tensor) -> dict[str, GoalFold]:
        """The reward and Q heads with goals g (B, goal_dim) folded into their weights
        (`GoalFold`), for scoring many states for one goal each (imagination).

        An agent plans for the same goals step after step, and folding costs about a millisecond
        (measured: 1.2 ms of a 14 ms CEM call whose 512 candidates are one sequence), so without
        autograd the last few folds are kept, found again by the goals' values, until a head's
        weights change."""
        def fold() -> dict[str, GoalFold]:
            psi = self.goal_features(g)
            return {"reward": self.reward_head.fold(psi["reward"]),
                    "q": self.q_head.fold(psi["q"])}

        heads = (*self.reward_head.parameters(), *self.q_head.parameters())
        kept: list = kept_while_frozen(self, "_folds_cache", heads, list)  # [(goals, fold)]
        if torch.is_grad_enabled():
            return fold()
        for goals, folded in kept:
            if (goals.shape, goals.dtype, goals.device) == (g.shape, g.dtype, g.device) \
                    and torch.equal(goals, g):
                return folded
        folded = fold()
        kept[:] = [(g.detach().clone(), folded), *kept[:3]]
        return folded

    def reward_folded(self, fold: dict[str, GoalFold], h: Tensor, action: Tensor,
                      env: Tensor) -> Tensor:
        """`reward` of h (M, latent), action (M,) for goal env (M,) of `fold_goals` -> (M,)."""
        return fold["reward"](h, env, self._core(h, action))[:, 0]

    def q_folded(self, fold: dict[str, GoalFold], h: Tensor, env: Tensor) -> Tensor:
        """`q` of h (M, latent) for goal env (M,) of `fold_goals` -> (M, A)."""
        return fold["q"](h, env)

    def goal_features(self, g: Tensor) -> dict[str, Tensor]:
        """g (..., goal_dim) -> the goal streams of the reward and Q heads."""
        return {"reward": self.reward_head.goal_features(g), "q": self.q_head.goal_features(g)}

    def cont(self, h: Tensor, action: Tensor) -> Tensor:
        """h (..., d), action (...) -> logit that the episode goes on after the next observation."""
        return self.cont_head(self._core(h, action)).squeeze(-1)

    # ------------------------------------------------------------------ training

    def loss(self, batch: dict[str, Tensor], goal_table: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Loss on a batch of windows: teacher-forced dynamics, reward and continuation, and TD
        for Q with relabelled goals.

        batch: image (B, L+1, 7, 7, 3), direction (B, L+1), carrying (B, L+1, 2), action (B, L),
        prev_action (B,) (the action before the window; `START` at an episode's start), mask
        (B, L), is_terminal (B, L+1), and relabelled goal slots goal (B, L, G) (indices into
        goal_table (V, goal_dim)), goal_reward (B, L, G) targets and goal_mask (B, L, G).
        Returns the total loss and its parts as floats.
        """
        cfg = self.cfg
        length = batch["action"].shape[1]
        mask = batch["mask"].float()  # (B, L)
        denom = mask.sum().clamp(min=1)
        z = self.encode(batch["image"], batch["direction"], batch["carrying"])  # (B, L+1, d)
        prev = torch.cat([batch["prev_action"][:, None], batch["action"]], dim=1)  # (B, L+1)
        h_all = self.sequence(z, prev)  # (B, L+1, d)
        h, action = h_all[:, :length], batch["action"]

        target_img = batch["image"][:, 1:].long()  # (B, L, 7, 7, 3)
        obs_loss = h.new_zeros(())
        for k in range(cfg.ensemble):
            logits = self.decode(h, action, k)
            cells = (
                _ce(logits["type"], target_img[..., 0])
                + _ce(logits["color"], target_img[..., 1])
                + _ce(logits["state"], target_img[..., 2].clamp(max=N_STATES - 1))
            ).mean(dim=(-1, -2))  # (B, L)
            rest = (
                _ce(logits["direction"], batch["direction"][:, 1:])
                + _ce(logits["carry_type"], batch["carrying"][:, 1:, 0])
                + _ce(logits["carry_color"], batch["carrying"][:, 1:, 1])
            ) / N_CELLS
            obs_loss = obs_loss + ((cells + rest) * mask).sum() / denom
        obs_loss = obs_loss / cfg.ensemble

        psi = self.goal_features(goal_table)  # each goal of the table once
        goals = batch["goal"]  # (B, L, G)
        gmask = batch["goal_mask"].float()
        gdenom = gmask.sum().clamp(min=1)
        r_target = batch["goal_reward"]  # (B, L, G)
        reward_logits = self.reward_head.pairwise(
            self.with_action(h, action), psi["reward"], goals)[..., 0]  # (B, L, G)
        reward_loss = (F.binary_cross_entropy_with_logits(
            reward_logits, r_target, reduction="none") * gmask).sum() / gdenom

        alive = 1.0 - batch["is_terminal"][:, 1:].float()  # (B, L): o_{t+1} is not terminal
        cont_loss = (F.binary_cross_entropy_with_logits(
            self.cont(h, action), alive, reduction="none") * mask).sum() / denom

        # TD: Q(h_t, a_t, g) <- r + gamma (1 - r) alive max_a' Q_target(h_{t+1}, a', g); padded
        # steps are masked, and h_{t+1} of the window's last step exists (L+1 observations).
        # Double DQN: the online head picks the next action, the target head values it, which
        # keeps the max over noisy estimates from inflating every value towards 1.
        psi_q = psi["q"]  # (V, P): gathered per goal slot inside `pairwise`
        h_next = h_all[:, 1:].detach()
        with torch.no_grad():
            psi_target = self.q_target.goal_features(goal_table)
            next_q = self.q_target.pairwise(h_next, psi_target, goals)  # (B, L, G, A)
            if cfg.double_q:
                best = self.q_head.pairwise(h_next, psi_q, goals).argmax(-1, keepdim=True)
                bootstrap = torch.sigmoid(next_q.gather(-1, best))[..., 0]  # (B, L, G)
            else:
                bootstrap = torch.sigmoid(next_q).amax(-1)
            y = r_target + cfg.discount * (1 - r_target) * alive[..., None] * bootstrap
        q_all = self.q_head.pairwise(h, psi_q, goals)  # (B, L, G, A)
        q_taken = q_all.gather(-1, action[:, :, None, None].expand(*goals.shape, 1))[..., 0]
        q_loss = (F.binary_cross_entropy_with_logits(q_taken, y, reduction="none")
                  * gmask).sum() / gdenom

        total = obs_loss + reward_loss + cont_loss + q_loss
        parts = {"loss": total, "obs": obs_loss, "reward": reward_loss, "cont": cont_loss,
                 "q": q_loss, "q_mean": (torch.sigmoid(q_taken) * gmask).sum() / gdenom}
        return total, {k: float(v.detach()) for k, v in parts.items()}

    @torch.no_grad()
    def update_target(self) -> None:
        """Move the target Q head towards the online one (call after each optimizer step)."""
        for tgt, src in zip(self.q_target.parameters(), self.q_head.parameters(), strict=True):
            tgt.lerp_(src, 1.0 - self.cfg.target_ema)

    # ------------------------------------------------------------------ imagination

    @staticmethod
    def most_likely(logits: dict[str, Tensor]) -> dict[str, Tensor]:
        """Decoded logits -> the most likely observation: image (..., 7, 7, 3), direction,
        carrying (..., 2), as int64 tensors."""
        image = torch.stack(
            [logits["type"].argmax(-1), logits["color"].argmax(-1), logits["state"].argmax(-1)],
            dim=-1,
        )
        carrying = torch.stack(
            [logits["carry_type"].argmax(-1), logits["carry_color"].argmax(-1)], dim=-1
        )
        return {"image": image, "direction": logits["direction"].argmax(-1), "carrying": carrying}

    def disagreement(self, h: Tensor, action: Tensor) -> Tensor:
        """h (..., d), action (...) -> mean variance across decoder heads of the predicted
        cell-type probabilities (...); zeros with a single head."""
        if self.cfg.ensemble < 2:
            return h.new_zeros(h.shape[:-1])
        probs = torch.stack([self.decode(h, action, k)["type"].softmax(-1)
                             for k in range(self.cfg.ensemble)])
        return probs.var(dim=0).mean(dim=(-1, -2, -3))

    @torch.no_grad()
    def imagine(
        self, state: BatchState, h: Tensor, actions: Tensor, goal: Tensor | None = None,
        decode_frames: bool = False,
    ) -> dict[str, Tensor]:
        """Roll the model forward under action sequences (B, H) from h (B, d), the history
        through the current real observation, and `state` (consumed), the backbone state after
        it. Returns per imagined step reward and cont logits (B, H) (reward needs `goal`, (B,
        goal_dim) or (goal_dim,)), the histories h (B, H, d) after each imagined observation,
        the terminal value logit (B,) of the last one, and with `decode_frames` the imagined
        observations image (B, H, 7, 7, 3), direction (B, H), carrying (B, H, 2)."""
        psi = None
        if goal is not None:
            psi = self.goal_features(goal)
        rewards, conts, hs, frames = [], [], [], []
        for t in range(actions.shape[1]):
            a = actions[:, t]
            if psi is not None:
                rewards.append(self.reward(h, a, psi=psi["reward"]))
            conts.append(self.cont(h, a))
            if decode_frames:
                obs = self.most_likely(self.decode(h, a))
                z = self.encode(obs["image"], obs["direction"], obs["carrying"])
                frames.append(obs)
            else:
                z = self.predict_latent(h, a)
            h, state = self.next(state, z, a)
            hs.append(h)
        out: dict[str, Tensor] = {"h": torch.stack(hs, dim=1), "cont": torch.stack(conts, 1)}
        if psi is not None:
            out["reward"] = torch.stack(rewards, dim=1)
            out["value"] = self.value(h, psi=psi["q"])
        if decode_frames:
            for key in ("image", "direction", "carrying"):
                out[key] = torch.stack([f[key] for f in frames], dim=1)
        return out

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write `config.json` and `model.safetensors` into directory `path` (atomically).
        `dtype` (e.g. torch.float16: half the file, for shipping) stores floating-point weights
        in that type; `from_pretrained` loads them back into the model's own dtype."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "version": 1, "config": self.cfg.to_dict()}
        _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2)))
        tensors = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point()
                                    else v.dtype).contiguous().cpu()
                   for k, v in self.state_dict().items()}
        _atomic_write(path / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, expect: WorldModelConfig | None = None
    ) -> WorldModel:
        """Load a directory written by `save_pretrained`. With `expect`, refuse a checkpoint whose
        config differs, naming the fields. Never unpickles: config is JSON, weights safetensors."""
        cfg = load_config(path)
        if expect is not None and cfg != expect:
            diff = _config_diff(expect.to_dict(), cfg.to_dict())
            raise CheckpointError(f"{path}: checkpoint config does not match: {diff}")
        model = cls(cfg)
        model.load_state_dict(_load_weights(Path(path) / WEIGHTS_NAME, model))
        return model


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the last dim of logits (..., C) with int targets (...) -> (...)."""
    return F.cross_entropy(logits.flatten(0, -2), target.flatten().long(),
                           reduction="none").view(target.shape)


def model_dir(spec: str | Path) -> Path:
    """The model directory a checkpoint spec names: 'shipped:SUITE' (the checkpoint lwm ships
    for SUITE), a run directory (its `model/`) or a model directory."""
    if isinstance(spec, str) and spec.startswith("shipped:"):
        from lwm.resources import checkpoint

        suite = spec.removeprefix("shipped:")
        path = checkpoint(suite)
        if path is None:
            raise CheckpointError(f"lwm ships no checkpoint for suite {suite!r}")
        return path
    path = Path(spec)
    return path / "model" if (path / "model").is_dir() else path


def load_config(path: str | Path) -> WorldModelConfig:
    """The `WorldModelConfig` of a checkpoint directory, with clear errors for foreign files."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{path}: not an lwm world-model checkpoint (no {CONFIG_NAME})")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: corrupt config ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an lwm world-model config (format != {FORMAT!r})")
    try:
        return WorldModelConfig.from_dict(data["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: malformed config ({err})") from None


def _load_weights(file: Path, model: nn.Module) -> dict[str, Tensor]:
    return check_tensors(file, read_safetensors(file), model.state_dict())


def read_safetensors(file: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a missing or corrupt file is a `CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file.parent}: checkpoint has no {file.name}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: corrupt weights ({err})") from None


def check_tensors(file: Path, tensors: dict[str, Tensor],
                  expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` (read from `file`) if they have exactly the names and shapes of `expected`
    and are finite; else a `CheckpointError` naming the problem."""
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise CheckpointError(
            f"{file}: weights do not fit the config (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{file}: {name} has shape {tuple(tensor.shape)}, the config needs "
                f"{tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: {name} contains NaN or inf")
    return tensors


def _config_diff(a: dict, b: dict, prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            inner = _config_diff(va, vb, f"{prefix}{key}.")
            if inner:
                diffs.append(inner)
        elif va != vb:
            diffs.append(f"{prefix}{key}: expected {va!r}, checkpoint has {vb!r}")
    return "; ".join(diffs)


def _atomic_write(path: Path, write) -> None:
    import os

    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
