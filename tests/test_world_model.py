"""The world model: shapes, step == sequence, loss goes down, save/load, bad checkpoints."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from lwm.envs.spatial import enterable, view_positions
from lwm.models.metrics import auroc, open_loop_accuracy
from lwm.models.world_model import (
    CELL_IDS,
    MAP_CELLS,
    MAP_RADIUS,
    MAP_SIDE,
    MAP_SIZE,
    N_CELLS,
    OBS_LOGITS,
    CheckpointError,
    WorldModel,
    _GoalHead,
    ego_sources,
    enterable_cells,
    map_sources,
    map_view,
    pack_cells,
    preset,
    unpack_cells,
)


def _batch(b=3, length=6, goals=4, vocab=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 3, (b, length + 1, 7, 7, 3), generator=g),
        "direction": torch.randint(0, 4, (b, length + 1), generator=g),
        "carrying": torch.randint(0, 6, (b, length + 1, 2), generator=g),
        "action": torch.randint(0, 7, (b, length), generator=g),
        "mask": torch.ones(b, length, dtype=torch.bool),
        "is_terminal": torch.zeros(b, length + 1, dtype=torch.bool),
        "goal": torch.randint(0, vocab, (b, length, goals), generator=g),
        "prev_action": torch.full((b,), 7),
        "goal_reward": torch.randint(0, 2, (b, length, goals), generator=g).float(),
        "goal_mask": torch.ones(b, length, goals, dtype=torch.bool),
    }


@pytest.mark.parametrize("backbone", ["mamba2", "gru", "transformer", "mamba2+map"])
def test_stepping_matches_the_sequence_pass(backbone):
    torch.manual_seed(0)
    backbone, _, decoder = backbone.partition("+")
    model = WorldModel(preset("debug", backbone=backbone, decoder=decoder or "mlp")).eval()
    batch = _batch()
    z = model.encode(batch["image"][:, :6], batch["direction"][:, :6], batch["carrying"][:, :6])
    prev = torch.cat([torch.full((3, 1), model.START), batch["action"][:, :5]], dim=1)
    with torch.no_grad():
        h_seq = model.sequence(z, prev)
        state, hs = model.init_state(3), []
        for t in range(6):
            h, state = model.next(state, z[:, t], prev[:, t])
            hs.append(h)
    torch.testing.assert_close(torch.stack(hs, 1), h_seq, atol=1e-5, rtol=1e-4)


def test_imagine_shapes_and_state_is_consumed_not_shared():
    model = WorldModel(preset("debug")).eval()
    batch = _batch()
    z = model.encode(batch["image"][:, 0], batch["direction"][:, 0], batch["carrying"][:, 0])
    h, state = model.next(model.init_state(3), z, torch.full((3,), model.START))
    out = model.imagine(state.clone(), h, batch["action"], goal=torch.randn(384),
                        decode_frames=True)
    assert out["h"].shape == (3, 6, model.latent_dim) and out["reward"].shape == (3, 6)
    assert out["value"].shape == (3,) and out["cont"].shape == (3, 6)
    assert out["image"].shape == (3, 6, 7, 7, 3) and out["carrying"].shape == (3, 6, 2)
    again = model.imagine(state.clone(), h, batch["action"], goal=torch.randn(384))
    torch.testing.assert_close(again["h"], out["h"])


def _fit(model: WorldModel, batch: dict, updates: int) -> tuple[dict, dict]:
    """Adam on one batch for `updates` steps -> the loss parts of the first and the last."""
    table = torch.nn.functional.normalize(torch.randn(10, 384), dim=-1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(updates):
        loss, parts = model.loss(batch, table)
        first = first if first is not None else parts
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target()
    return first, parts


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    first, parts = _fit(WorldModel(preset("debug")), _batch(), 60)
    assert all(np.isfinite(list(parts.values())))
    assert parts["loss"] < 0.6 * first["loss"]
    assert parts["reward"] < first["reward"] and parts["q"] < first["q"]


def test_q_learns_the_discounted_chance_of_a_goal():
    """One deterministic 3-step chain where only the last action achieves goal 0: TD must give
    Q(step t, taken action) ~ gamma**(2 - t)."""
    torch.manual_seed(0)
    model = WorldModel(preset("debug"))
    batch = _batch(b=1, length=3, goals=2, vocab=2)
    batch["goal"] = torch.tensor([[[0, 1]] * 3])
    batch["goal_reward"] = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])
    batch["is_terminal"][0, 3] = True
    table = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss, _ = model.loss(batch, table)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target()
    z = model.encode(batch["image"][:, :3], batch["direction"][:, :3], batch["carrying"][:, :3])
    prev = torch.cat([batch["prev_action"][:, None], batch["action"][:, :2]], dim=1)
    with torch.no_grad():
        q = torch.sigmoid(model.q(model.sequence(z, prev), table[0]))[0]  # (3, A)
    taken = q.gather(-1, batch["action"][0, :, None])[:, 0]
    gamma = model.cfg.discount
    torch.testing.assert_close(taken, torch.tensor([gamma**2, gamma, 1.0]), atol=0.08, rtol=0)


def test_double_q_targets_use_the_online_argmax():
    """With target == online head, Double DQN's target is the plain max (same loss); once the
    heads differ, the online argmax picks the action the target head values (a lower target)."""
    torch.manual_seed(0)
    batch = _batch()
    table = torch.nn.functional.normalize(torch.randn(10, 384), dim=-1)
    double = WorldModel(preset("debug"))
    plain = WorldModel(dataclasses.replace(preset("debug"), double_q=False))
    plain.load_state_dict(double.state_dict())
    torch.testing.assert_close(double.loss(batch, table)[1]["q"], plain.loss(batch, table)[1]["q"])
    with torch.no_grad():  # a target head that disagrees with the online one
        for p in double.q_target.parameters():
            p.add_(torch.randn_like(p))
    plain.load_state_dict(double.state_dict())
    # The double target values one action; the plain target the best one, so it is never lower.
    # Both losses use reward 0/1 targets through BCE, so compare the bootstraps directly.
    h_next = torch.randn(2, 3, double.latent_dim)
    psi_t = double.q_target.goal_features(table[:4])[None, None].expand(2, 3, 4, -1)
    psi_o = double.q_head.goal_features(table[:4])[None, None].expand(2, 3, 4, -1)
    with torch.no_grad():
        target = double.q_target.pairwise(h_next, psi_t)
        best = double.q_head.pairwise(h_next, psi_o).argmax(-1, keepdim=True)
    assert (target.gather(-1, best)[..., 0] <= target.amax(-1)).all()
    assert (target.gather(-1, best)[..., 0] < target.amax(-1)).any()
    assert double.loss(batch, table)[1]["q"] != plain.loss(batch, table)[1]["q"]


def test_save_load_round_trip(tmp_path):
    model = WorldModel(preset("debug", backbone="gru")).eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = WorldModel.from_pretrained(tmp_path / "ckpt", expect=preset("debug", backbone="gru"))
    batch = _batch()
    z1 = model.encode(batch["image"], batch["direction"], batch["carrying"])
    z2 = loaded.encode(batch["image"], batch["direction"], batch["carrying"])
    torch.testing.assert_close(model.sequence(z1[:, :6], batch["action"]),
                               loaded.sequence(z2[:, :6], batch["action"]))
    torch.testing.assert_close(loaded.q_target.goal_mlp[0].weight,
                               model.q_target.goal_mlp[0].weight)


def test_half_precision_checkpoint_is_half_the_file_and_loads_into_fp32(tmp_path):
    from safetensors.torch import load_file

    model = WorldModel(preset("debug")).eval()
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    full, half = (tmp_path / d / "model.safetensors" for d in ("full", "half"))
    assert half.stat().st_size < 0.6 * full.stat().st_size
    stored = load_file(str(half))
    assert all(t.dtype in (torch.float16, torch.int64) for t in stored.values())
    loaded = WorldModel.from_pretrained(tmp_path / "half")
    for name, value in loaded.state_dict().items():
        original = model.state_dict()[name]
        assert value.dtype == original.dtype, name
        torch.testing.assert_close(value, original, rtol=1e-3, atol=1e-4)


def test_refuses_mismatched_corrupt_and_foreign_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    WorldModel(preset("debug")).save_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="backbone: expected 'gru', checkpoint has 'mamba2'"):
        WorldModel.from_pretrained(ckpt, expect=preset("debug", backbone="gru"))
    with pytest.raises(CheckpointError, match="no config.json"):
        WorldModel.from_pretrained(tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not an lwm world-model config"):
        WorldModel.from_pretrained(tmp_path / "foreign")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt weights"):
        WorldModel.from_pretrained(ckpt)


def test_refuses_nan_weights(tmp_path):
    model = WorldModel(preset("debug"))
    with torch.no_grad():
        model.cell_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="cell_proj.weight contains NaN"):
        WorldModel.from_pretrained(tmp_path)


def test_auroc():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([1, 2, 3]), np.array([0, 1, 1])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert np.isnan(auroc(np.array([1.0]), np.array([1])))


def test_open_loop_accuracy_is_perfect_for_a_model_that_copies_the_truth(monkeypatch):
    model = WorldModel(preset("debug")).eval()
    batch = _batch(length=8)
    truth = batch["image"]
    calls = {"t": 0}

    def perfect_decode(h, action, head=0):
        t = calls["t"]
        calls["t"] += 1
        onehot = torch.nn.functional.one_hot
        img = truth[:, 2 + t]
        return {"type": onehot(img[..., 0], 11).float(), "color": onehot(img[..., 1], 6).float(),
                "state": onehot(img[..., 2], 3).float(),
                "direction": onehot(batch["direction"][:, 2 + t], 4).float(),
                "carry_type": onehot(batch["carrying"][:, 2 + t, 0], 11).float(),
                "carry_color": onehot(batch["carrying"][:, 2 + t, 1], 6).float()}

    monkeypatch.setattr(model, "decode", perfect_decode)
    acc = open_loop_accuracy(model, truth, batch["direction"], batch["carrying"],
                             batch["action"], start=1, horizons=(1, 5))
    assert acc == {1: 1.0, 5: 1.0}


@pytest.mark.parametrize("suite", ["babyai-goto", "balrog-babyai", "babyai-putnext"])
def test_the_shipped_checkpoints_load_as_the_small_preset(suite):
    from lwm.resources import checkpoint

    path = checkpoint(suite)
    assert path is not None
    model = WorldModel.from_pretrained(path, expect=preset("small"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    shipped = path.parent.glob("*/model.safetensors")
    assert sum(f.stat().st_size for f in shipped) < 20 * 2**20  # all of them together


@pytest.mark.parametrize("goal_maps", [0, 4])
def test_the_reward_of_a_pair_is_the_heads_on_the_pairs_features(goal_maps):
    # `reward` adds the action to the history without copying the cells beside it; the head
    # must read what training feeds it, `with_action`'s features of the pair.
    torch.manual_seed(0)
    model = WorldModel(preset("debug", goal_maps=goal_maps)).eval()
    h, g = torch.randn(6, model.latent_dim), torch.randn(6, 384)
    action = torch.randint(0, model.cfg.n_actions, (6,))
    expected = model.reward_head(model.with_action(h, action), g)[..., 0]
    torch.testing.assert_close(model.reward(h, action, g), expected)


@pytest.mark.parametrize("maps", [0, 3])
@pytest.mark.parametrize("n_out", [1, 4])
@pytest.mark.parametrize("n_goals", [1, 3])
def test_a_folded_head_scores_as_the_head(maps, n_out, n_goals):
    # Goals folded into the weights give the head's logits for each row's own goal, with or
    # without a replaced core, for one goal or several.
    torch.manual_seed(0)
    head = _GoalHead(d=8, goal_dim=5, hidden=6, n_out=n_out, maps=maps, cell_dim=3)
    width = 8 + (MAP_CELLS * 3 if maps else 0) + 2  # and a tail the head does not read
    h, g = torch.randn(20, width), torch.randn(n_goals, 5)
    env = torch.randint(0, n_goals, (20,))
    psi = head.goal_features(g)
    fold = head.fold(psi)
    torch.testing.assert_close(fold(h, env), head(h, psi=psi[env]), rtol=1e-5, atol=1e-5)
    core = torch.randn(20, 8)
    torch.testing.assert_close(fold(h, env, core), head(h, psi=psi[env], core=core),
                               rtol=1e-5, atol=1e-5)


def test_a_model_made_in_inference_mode_imagines():
    # Its weights are inference tensors, which count no versions: nothing derived from them
    # is kept, and imagination still runs.
    with torch.inference_mode():
        model = WorldModel(preset("debug", decoder="map")).eval()
        h = torch.zeros(3, model.latent_dim)
        action = torch.tensor([0, 1, 2])
        z = model.predict_latent(h, action)
        obs = model.most_likely(model.decode(h, action))
        torch.testing.assert_close(z, model.encode(obs["image"], obs["direction"],
                                                   obs["carrying"]))
        _, state = model.next(model.init_state(3), z, action)
    assert "_latent_tables_cache" not in model.__dict__


def test_folds_are_kept_for_the_same_goals_until_a_head_changes():
    torch.manual_seed(0)
    model = WorldModel(preset("debug")).eval()
    goal = torch.randn(2, model.cfg.goal_dim)
    with torch.no_grad():
        first = model.fold_goals(goal)
        assert model.fold_goals(goal.clone()) is first  # found again by value
        other = model.fold_goals(goal + 1.0)
        assert other is not first
        assert model.fold_goals(goal) is first  # the last few are kept
        goal.add_(0.5)  # the caller's goals changed in place: a new fold, not the kept one
        moved = model.fold_goals(goal)
        assert moved is not first
        model.q_head.goal_mlp[0].bias.add_(0.1)  # a head's weights changed: folded afresh
        changed = model.fold_goals(goal)
        assert changed is not moved
        h = torch.randn(3, model.latent_dim)
        env = torch.tensor([0, 1, 1])
        torch.testing.assert_close(model.q_folded(changed, h, env),
                                   model.q(h, goal[env]), atol=1e-5, rtol=1e-5)
    # with autograd on nothing is kept: the fold is differentiable
    assert model.fold_goals(goal) is not model.fold_goals(goal)


def test_the_world_models_folded_reward_is_its_reward():
    torch.manual_seed(0)
    model = WorldModel(preset("debug", goal_maps=4)).eval()
    h, g = torch.randn(12, model.latent_dim), torch.randn(2, 384)
    action, env = torch.randint(0, model.cfg.n_actions, (12,)), torch.arange(12) % 2
    fold = model.fold_goals(g)
    torch.testing.assert_close(model.reward_folded(fold, h, action, env),
                               model.reward(h, action, g[env]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fold["q"](h, env), model.q(h, g[env]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("maps", [0, 3])
def test_pairwise_goal_scores_equal_one_goal_at_a_time(maps):
    torch.manual_seed(0)
    head = _GoalHead(d=8, goal_dim=5, hidden=6, n_out=4, maps=maps, cell_dim=3)
    width = 8 + (MAP_CELLS * 3 if maps else 0)
    h, g = torch.randn(2, 3, width), torch.randn(2, 3, 7, 5)  # 7 goals per state
    pairs = head.pairwise(h, head.goal_features(g))
    singles = torch.stack([head(h, g[:, :, i]) for i in range(7)], dim=2)
    assert pairs.shape == (2, 3, 7, 4)
    torch.testing.assert_close(pairs, singles, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("maps", [0, 3])
def test_pairwise_from_a_goal_table_equals_gathered_goals_with_gradients(maps):
    torch.manual_seed(0)
    head = _GoalHead(d=8, goal_dim=5, hidden=6, n_out=4, maps=maps, cell_dim=3)
    width = 8 + (MAP_CELLS * 3 if maps else 0)
    table, goals = torch.randn(9, 5), torch.randint(0, 9, (2, 3, 7))

    def scores_and_grads(from_table: bool):
        head.zero_grad(set_to_none=True)
        h = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(1)).requires_grad_()
        psi = head.goal_features(table)
        out = head.pairwise(h, psi, goals) if from_table else head.pairwise(h, psi[goals])
        out.square().sum().backward()
        return [out, h.grad] + [p.grad for p in head.parameters()]

    for a, b in zip(scores_and_grads(True), scores_and_grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the ego decoder


@pytest.mark.parametrize("level", ["lwm/BabyAI-GoToLocal-v0", "lwm/BabyAI-PickupLoc-v0"])
def test_ego_sources_are_where_real_views_move(level):
    """Under random play, every next-view cell with a source shows what the current view showed
    there (both visible), except the cell in front (pick-up, drop, toggle change it) and the
    agent's own cell (it shows what is carried)."""
    import gymnasium as gym

    import lwm.envs  # noqa: F401 - registers the lwm/ ids

    sources = ego_sources()
    env = gym.make(level)
    rng = np.random.default_rng(0)
    checked, mismatched = {}, []
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        for _ in range(40):
            action = int(rng.integers(0, 6))
            pos = tuple(env.unwrapped.agent_pos)
            new, *_ = env.step(action)
            moved = int(tuple(env.unwrapped.agent_pos) != pos)
            before, after = obs["image"].reshape(49, 3), new["image"].reshape(49, 3)
            for cell, src in enumerate(sources[action, moved].tolist()):
                if src == N_CELLS or cell in (3 * 7 + 5, 3 * 7 + 6):
                    continue
                if before[src, 0] == 0 or after[cell, 0] == 0:  # unseen on either side
                    continue
                key = (action, moved)
                checked[key] = checked.get(key, 0) + 1
                if not (before[src] == after[cell]).all():
                    mismatched.append((action, moved, divmod(cell, 7)))
            obs = new
    assert not mismatched, mismatched[:5]
    for key in [(0, 0), (1, 0), (2, 1), (2, 0), (3, 0), (5, 0)]:  # turns, moves, blocked moves
        assert checked.get(key, 0) > 100, (key, checked)
    # no source where the view shows something new
    assert (sources[0, 0].view(7, 7)[:3] == N_CELLS).all()  # left turn: the left of the view
    assert (sources[2, 1].view(7, 7)[:, 0] == N_CELLS).all()  # moved: the far row


def _copy_source_0_only(model: WorldModel) -> None:
    """Zero the decoder MLP's cell logits, open every source-0 gate and shut every source-1 one."""
    last = model.decoders[0][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[OBS_LOGITS : OBS_LOGITS + N_CELLS] = 30.0  # source 0: open
        last.bias[OBS_LOGITS + N_CELLS :] = -30.0  # source 1: shut


def _check_copies_read_their_sources(decoder: str, sources: torch.Tensor) -> None:
    """With the MLP's cell logits at zero, source-0 gates open and source-1 gates shut, after a
    left turn and a pick-up each next-view cell of a `decoder` model is the read (`cell_read`
    of the embedding) of the id h carries where `sources` (2, 49) point; none (the ids' count)
    reads nothing."""
    torch.manual_seed(0)
    model = WorldModel(preset("debug", decoder=decoder)).eval()
    _copy_source_0_only(model)
    n_ids = model.latent_dim - model.feature_dim
    ids = torch.randint(0, CELL_IDS, (2, n_ids))
    h = torch.zeros(2, model.latent_dim)
    h[:, model.feature_dim :] = ids.float()
    with torch.no_grad():
        logits = model.decode(h, torch.tensor([0, 3]))  # left turn, pick-up
        table = model.cell_read(model._embed_cells(unpack_cells(torch.arange(CELL_IDS))))
    got = torch.cat([logits[k] for k in ("type", "color", "state")], -1).reshape(2, N_CELLS, -1)
    for row in range(2):
        for cell in range(N_CELLS):
            s = int(sources[row, cell])
            want = torch.zeros(20) if s == n_ids else table[ids[row, s]]
            torch.testing.assert_close(got[row, cell], want, atol=1e-4, rtol=1e-4)


def test_ego_decoder_adds_gated_reads_of_the_source_cells():
    """Each next-view cell reads the current view's cell it comes from (`ego_sources`), by the
    id h carries, through the table of cell reads; cells without a source read nothing."""
    src = ego_sources()[[0, 3], 0]  # left turn, pick-up
    _check_copies_read_their_sources("ego", src)
    assert src[0, 6 * 7 + 6] == 3 * 7 + 3  # after a left turn (6, 6) shows (3, 3)
    assert (src[0] == N_CELLS).sum() > 0 and (src[1] == torch.arange(N_CELLS)).all()


def test_map_decoder_adds_gated_reads_of_the_remembered_cells():
    """Each next-view cell reads the map cell it comes from (`map_sources`) through the table
    of cell reads; cells without a source read nothing."""
    src = map_sources()[[0, 3], 0]
    _check_copies_read_their_sources("map", src)
    # after a left turn the view shows the agent's left: view cell (0, 6), 3 to the left,
    # shows what was 3 behind, map (7, 10); with the pose kept, the view is where it was
    assert src[0, 0 * 7 + 6] == 7 * MAP_SIDE + 10
    assert (src[1] == map_view()).all()
    assert (src[0] == MAP_SIZE).sum() == 0  # the map reaches every cell a turn brings in


@pytest.mark.parametrize("decoder", ["ego", "map"])
def test_copy_decoders_decode_the_same_with_and_without_autograd(decoder):
    # Imagination's copy term sums each cell's two sources in an embedding bag; training's
    # gathers, weights and sums them: the same logits, for leading dims of any shape.
    torch.manual_seed(0)
    model = WorldModel(preset("debug", decoder=decoder)).eval()
    h = torch.randn(5, 3, model.latent_dim)
    h[..., model.feature_dim :] = torch.randint(0, CELL_IDS, (5, 3, model.latent_dim
                                                              - model.feature_dim)).float()
    action = torch.randint(0, model.cfg.n_actions, (5, 3))
    trained = model.decode(h, action)  # autograd on: the gather
    assert trained["type"].requires_grad
    with torch.no_grad():
        imagined = model.decode(h, action)
    for key, value in trained.items():
        torch.testing.assert_close(imagined[key], value.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["ego", "map"])
def test_copy_decoders_train_save_and_load(tmp_path, decoder):
    torch.manual_seed(0)
    cfg = preset("debug", decoder=decoder, goal_maps=0)
    model = WorldModel(cfg)
    if decoder == "ego":  # the decoder alone makes h carry the current cells, and their ids
        assert model.feature_dim == cfg.d_model + MAP_CELLS * cfg.cell_dim
        assert model.latent_dim == model.feature_dim + N_CELLS
    else:  # h carries the map's cell ids, which no head but the decoder reads
        assert model.feature_dim == cfg.d_model and model.latent_dim == cfg.d_model + MAP_SIZE
    batch = _batch()
    first, parts = _fit(model, batch, 40)
    assert parts["obs"] < 0.6 * first["obs"]
    model.eval().save_pretrained(tmp_path / decoder)
    loaded = WorldModel.from_pretrained(tmp_path / decoder, expect=cfg).eval()
    z = model.encode(batch["image"], batch["direction"], batch["carrying"])
    h = model.sequence(z[:, :6], batch["action"])
    for key, value in model.decode(h, batch["action"]).items():
        torch.testing.assert_close(loaded.decode(h, batch["action"])[key], value)
    reads = "the current cells" if decoder == "ego" else "the map"
    with pytest.raises(ValueError, match=f"reads {reads} from h"):
        model.decode(h[..., : cfg.d_model], batch["action"])


def test_configs_without_a_decoder_are_mlp_and_unknown_decoders_are_refused(tmp_path):
    WorldModel(preset("debug")).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["config"]["decoder"]  # a checkpoint from before the option
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert WorldModel.from_pretrained(tmp_path).cfg.decoder == "mlp"
    data["config"]["decoder"] = "unet"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unknown decoder 'unet'"):
        WorldModel.from_pretrained(tmp_path)


def test_the_map_decoders_read_table_follows_its_weights():
    # Without autograd the table of cell reads is kept between decodes; a changed weight (an
    # optimizer step, a load) must show in the next decode, as if nothing had been kept.
    torch.manual_seed(0)
    model = WorldModel(preset("debug", decoder="map")).eval()
    h = torch.zeros(3, model.latent_dim)
    h[:, model.feature_dim :] = torch.randint(0, CELL_IDS, (3, MAP_SIZE)).float()
    action = torch.tensor([0, 2, 3])

    def decoded() -> torch.Tensor:
        with torch.no_grad():
            out = model.decode(h, action)
        return torch.cat([out[k] for k in ("type", "color", "state")], -1)

    first = decoded()
    assert torch.equal(decoded(), first)
    for weight in (model.cell_read[0].weight, model.color_emb.weight):
        with torch.no_grad():
            weight.add_(0.5)
        changed = decoded()
        with torch.enable_grad():  # the reference: computed afresh
            out = model.decode(h, action)
        reference = torch.cat([out[k] for k in ("type", "color", "state")], -1)
        torch.testing.assert_close(changed, reference.detach())
        assert not torch.equal(changed, first)
        first = changed


@pytest.mark.parametrize("decoder", ["mlp", "ego", "map"])
@pytest.mark.parametrize("goal_maps", [0, 4])
def test_predict_latent_is_the_encoded_most_likely_decode(decoder, goal_maps):
    # Imagination's fused step equals encoding the decoded argmax observation, for every
    # decoder and latent layout, and its kept tables follow changed weights.
    torch.manual_seed(0)
    model = WorldModel(preset("debug", decoder=decoder, goal_maps=goal_maps)).eval()
    h = torch.randn(40, model.latent_dim)
    if decoder != "mlp":  # the ids the copy decoders read
        h[:, model.feature_dim :] = torch.randint(0, CELL_IDS, (40, model.latent_dim
                                                                - model.feature_dim)).float()
    action = torch.randint(0, model.cfg.n_actions, (40,))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            obs = model.most_likely(model.decode(h, action))
            return (model.predict_latent(h, action),
                    model.encode(obs["image"], obs["direction"], obs["carrying"]))

    fused, reference = both()
    width = model.feature_dim + (N_CELLS if decoder != "mlp" else 0)  # the view's ids
    assert fused.shape == reference.shape == (40, width)
    # the bag sums cell_proj's terms in another order than its matmul: rounding differs
    torch.testing.assert_close(fused, reference, atol=5e-5, rtol=1e-4)
    for weight in (model.state_emb.weight, model.dir_emb.weight, model.cell_proj.weight,
                   model.cell_proj.bias, model.carry_color_emb.weight):
        with torch.no_grad():
            weight.add_(0.3)
        changed, reference = both()
        torch.testing.assert_close(changed, reference, atol=5e-5, rtol=1e-4)
        assert not torch.equal(changed, fused)
        fused = changed


def test_the_maps_move_rule_is_the_environments():
    """The map moves forward where the last front cell was enterable: the rule on packed ids
    agrees with `lwm.envs.spatial.enterable` for every cell there is."""
    cells = unpack_cells(torch.arange(CELL_IDS))
    assert pack_cells(cells.view(-1, 1, 1, 3)).flatten().tolist() == list(range(CELL_IDS))
    ours = enterable_cells(cells)
    assert ours.tolist() == [enterable(c) for c in cells.numpy()]
    assert 0 < int(ours.sum()) < CELL_IDS


@pytest.mark.parametrize("level", ["lwm/BabyAI-GoToLocal-v0", "lwm/BabyAI-PickupLoc-v0"])
def test_the_map_remembers_the_real_grid(level):
    """Kept by dead reckoning from real observations under random play (turns, moves, blocked
    moves, pick-ups, drops, toggles), every cell the map knows shows what the real grid holds
    at that place, and the map knows every cell the agent has seen."""
    import gymnasium as gym
    from minigrid.core.constants import DIR_TO_VEC

    import lwm.envs  # noqa: F401 - registers the lwm/ ids

    model = WorldModel(preset("debug", decoder="map")).eval()
    env = gym.make(level)
    rng = np.random.default_rng(0)
    r = MAP_RADIUS
    checked, wrong, forgotten = 0, [], 0
    for seed in range(8):
        obs, _ = env.reset(seed=seed)
        state, prev, ever = model.init_state(1), model.START, set()
        for _ in range(40):
            z = model.encode(*(torch.as_tensor(np.asarray(obs[k]))[None]
                               for k in ("image", "direction", "carrying")))
            _, state = model.next(state, z, torch.tensor([prev]))
            base = env.unwrapped
            forward = np.asarray(DIR_TO_VEC[base.agent_dir])
            right = np.array([-forward[1], forward[0]])
            for u, v in np.ndindex(MAP_SIDE, MAP_SIDE):
                pos = tuple(base.agent_pos + (r - v) * forward + (u - r) * right)
                known = int(state.grid[0, u * MAP_SIDE + v])
                if known == 0:
                    forgotten += pos in ever
                    continue
                checked += 1
                cell = base.grid.get(*pos)
                real = (1, 0, 0) if cell is None else cell.encode()
                if tuple(unpack_cells(torch.tensor(known)).tolist()) != tuple(real):
                    wrong.append((seed, pos, known, real))
            seen = obs["image"][..., 0] > 0
            seen[3, 6] = False
            ever |= {tuple(p) for p in view_positions(base.agent_pos, base.agent_dir)[seen]}
            prev = int(rng.integers(0, 6))
            obs, *_ = env.step(prev)
    assert not wrong, wrong[:5]
    assert checked > 10_000 and forgotten == 0
