"""The environment layer: observation format, events, achieved goals vs minigrid's verifier."""

import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from minigrid.utils.baby_ai_bot import BabyAIBot

import lwm.envs
from lwm.envs import OBJECT_TO_IDX, LanguageWrapper, goal_achieved, make_env
from lwm.envs.language import instr_goals, scene_goals
from lwm.goals import parse_goal

LWM_IDS = sorted(k for k in gym.registry if k.startswith("lwm/"))


def test_every_babyai_id_is_registered_under_lwm():
    babyai = [k for k in gym.registry if k.startswith("BabyAI-")]
    assert len(babyai) >= 90
    for k in babyai:
        assert f"lwm/{k}" in gym.registry
    assert "lwm/BabyAI-PickupThenGoToLocal-v0" in gym.registry


@pytest.mark.parametrize("env_id", LWM_IDS)
def test_check_env_and_determinism(env_id):
    env = gym.make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env warns that a wrapper is applied: it is ours
        check_env(env, skip_render_check=True)
    a, b = gym.make(env_id), gym.make(env_id)
    obs_a, _ = a.reset(seed=7)
    obs_b, _ = b.reset(seed=7)
    rng = np.random.default_rng(0)
    for _ in range(20):
        action = int(rng.integers(7))
        step_a, step_b = a.step(action), b.step(action)
        np.testing.assert_array_equal(step_a[0]["image"], step_b[0]["image"])
        assert step_a[1:4] == step_b[1:4]
        assert step_a[4]["events"] == step_b[4]["events"]
        if step_a[2] or step_a[3]:
            break
    np.testing.assert_array_equal(obs_a["image"], obs_b["image"])


def test_observation_format():
    env = gym.make("lwm/BabyAI-PutNextLocal-v0")
    obs, info = env.reset(seed=3)
    assert obs["image"].shape == (7, 7, 3) and obs["image"].dtype == np.uint8
    assert obs["direction"] in range(4)
    np.testing.assert_array_equal(obs["carrying"], lwm.envs.NOTHING_CARRIED)
    assert obs["mission"].startswith("put the")
    assert info["achieved"] == [] and isinstance(info["events"], list)
    assert env.observation_space.contains(obs)


def test_env_pickles():
    env = gym.make("lwm/BabyAI-GoToLocal-v0")
    env.reset(seed=1)
    clone = pickle.loads(pickle.dumps(env))
    np.testing.assert_array_equal(
        clone.step(2)[0]["image"], env.step(2)[0]["image"]
    )


def _drive(env_id, seed):
    """One bot-driven episode; yields (info, reward, terminated) per step."""
    env = make_env(env_id)
    _, info = env.reset(seed=seed)
    bot = BabyAIBot(env.unwrapped)
    goals = instr_goals(env.unwrapped.instrs)
    steps = []
    for _ in range(env.unwrapped.max_steps):
        _, reward, terminated, truncated, info = env.step(bot.replan())
        steps.append((info, reward, terminated))
        if terminated or truncated:
            break
    return goals, steps


@pytest.mark.parametrize(
    "env_id",
    [
        "BabyAI-GoToLocal-v0",
        "BabyAI-PickupLoc-v0",
        "BabyAI-PutNextLocal-v0",
        "BabyAI-OpenDoor-v0",
        "BabyAI-PickupThenGoToLocal-v0",
    ],
)
def test_achieved_goals_agree_with_minigrid_verifier(env_id):
    """The mission counts as done in lwm's achieved goals at exactly the step minigrid's own
    verifier says success, on 60 bot-driven episodes (colour, location and sequence missions)."""
    successes = 0
    for seed in range(60):
        goals, steps = _drive(env_id, seed)
        done_at, k = None, 0
        for t, (info, _, _) in enumerate(steps):
            while k < len(goals) and goal_achieved(goals[k], info):
                k += 1
            if k == len(goals):
                done_at = t
                break
        verifier_at = next((t for t, (_, r, term) in enumerate(steps) if term and r > 0), None)
        assert done_at == verifier_at, (env_id, seed, [g.text for g in goals])
        successes += verifier_at is not None
    assert successes >= 55  # the bot solves these levels; a broken env would not


def test_events_of_a_put_next_episode():
    goals, steps = _drive("BabyAI-PutNextLocal-v0", 0)
    events = [e for info, _, _ in steps for e in info["events"]]
    (goal,) = goals
    assert f"you picked up {goal.obj.text}" in events
    assert f"you dropped {goal.obj.text}" in events
    assert f"{goal.obj.text} is next to {goal.target.text}" in events
    achieved = [a for info, _, _ in steps for a in info["achieved"]]
    assert goal.text in achieved
    for text in achieved:
        assert parse_goal(text).is_concrete  # achieved goals are always concrete grammar texts


def test_open_door_events_and_locations():
    env = make_env("BabyAI-OpenDoorColor-v0")
    env.reset(seed=0)
    bot = BabyAIBot(env.unwrapped)
    opened = []
    for _ in range(100):
        _, _, term, trunc, info = env.step(bot.replan())
        opened += [e for e in info["events"] if e.endswith("door is open")]
        if term or trunc:
            break
    (goal,) = instr_goals(env.unwrapped.instrs)
    assert opened == [f"{goal.obj.text} is open"]


def test_scene_goals_name_the_objects_in_the_grid():
    env = make_env("lwm/BabyAI-MixedLocal-v0")
    seed = next(s for s in range(50)
                if env.reset(seed=s) and env.unwrapped.instrs.surface(env.unwrapped)
                .startswith("open"))
    env.reset(seed=seed)
    grid = [o for o in env.unwrapped.grid.grid if o is not None and o.type in ("key", "door")]
    key = next(o for o in grid if o.type == "key")
    door = next(o for o in grid if o.type == "door" and o.is_locked)
    texts = [g.text for g in scene_goals(env)]
    assert f"pick up the {key.color} key" in texts and f"go to the {key.color} key" in texts
    assert f"open the {door.color} door" in texts and f"go to the {door.color} door" in texts
    assert len(texts) == len(set(texts))
    assert all(not t.startswith("pick up") or "door" not in t for t in texts)
    door.is_locked, door.is_open = False, True  # an open door is no longer a goal to open
    assert f"open the {door.color} door" not in [g.text for g in scene_goals(env)]


def test_location_patterns_need_the_reported_locations():
    info = {"achieved": ["pick up the red ball"], "achieved_locs": [[["front", "left"], []]]}
    assert goal_achieved(parse_goal("pick up the ball on your left"), info)
    assert goal_achieved(parse_goal("pick up the red ball"), info)
    assert not goal_achieved(parse_goal("pick up the ball on your right"), info)
    assert not goal_achieved(parse_goal("pick up the blue ball"), info)


def test_text_observation_describes_the_view():
    env = make_env("BabyAI-GoToLocal-v0")
    env.reset(seed=1)
    text = env.text_observation()
    assert text.startswith("You are facing north. You are carrying nothing. You see ")
    assert "a purple box 1 step forward and 1 step left" in text
    assert "a wall 4 steps forward" in text
    env.step(0)  # turn left: the grey box two cells to the left is now ahead
    assert "a grey box 2 steps forward" in env.text_observation()


def test_wrapper_works_on_plain_minigrid():
    env = LanguageWrapper(gym.make("MiniGrid-DoorKey-5x5-v0"))
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    _, _, _, _, info = env.step(2)
    assert set(info) >= {"events", "achieved", "achieved_locs"}


def test_an_instruction_replaces_the_env_mission():
    env = make_env("BabyAI-GoToLocal-v0")
    obs, _ = env.reset(seed=0)
    own_mission, (own_goal,) = obs["mission"], instr_goals(env.unwrapped.instrs)
    bot = BabyAIBot(env.unwrapped)  # the bot plans for the env's own mission
    actions = []
    for _ in range(64):
        actions.append(bot.replan())
        _, reward, terminated, _, _ = env.step(actions[-1])
        if terminated:
            break
    assert reward > 0
    obs, _ = env.reset(seed=0, options={"instruction": "pick up the red ball"})
    assert obs["mission"] == "pick up the red ball" != own_mission
    for a in actions:  # the same actions achieve the env's own mission, which no longer counts
        _, reward, terminated, truncated, info = env.step(a)
        assert reward == 0 and not terminated
    assert goal_achieved(own_goal, info)  # reported as achieved all the same


def test_affordance_exploration_acts_on_the_cell_in_front():
    from lwm.envs.language import affordance_probs

    image = np.zeros((4, 7, 7, 3), np.uint8)
    image[..., 0] = OBJECT_TO_IDX["empty"]
    image[0, 3, 5] = (OBJECT_TO_IDX["key"], 0, 0)  # a key ahead, hands empty
    image[1, 3, 5] = (OBJECT_TO_IDX["door"], 0, 2)  # a locked door ahead
    image[2, 3, 5] = (OBJECT_TO_IDX["door"], 0, 0)  # an open door ahead
    image[3, 3, 5] = (OBJECT_TO_IDX["empty"], 0, 0)  # nothing ahead, carrying a ball
    nothing = list(lwm.envs.NOTHING_CARRIED)
    carrying = np.array([nothing, [OBJECT_TO_IDX["key"], 0], nothing,
                         [OBJECT_TO_IDX["ball"], 1]])
    p = affordance_probs(image, carrying)
    assert np.allclose(p.sum(1), 1) and (p[:, 6] == 0).all()  # never `done`
    pickup, drop, toggle = p[:, 3], p[:, 4], p[:, 5]
    assert pickup[0] > 0.3 and pickup[1:].max() == 0
    assert toggle[1] > 0.3 and toggle[[0, 2, 3]].max() == 0
    assert drop[3] > 0 and drop[:3].max() == 0
    assert np.allclose(p[2, :3] / p[2, :3].sum(), np.array([0.2, 0.2, 0.4]) / 0.8)


def test_locked_doors_in_view():
    from lwm.envs.language import locked_doors
    from lwm.goals import COLORS

    image = np.zeros((7, 7, 3), np.uint8)
    image[..., 0] = OBJECT_TO_IDX["empty"]
    image[1, 2] = (OBJECT_TO_IDX["door"], COLORS.index("red"), 2)  # locked
    image[4, 0] = (OBJECT_TO_IDX["door"], COLORS.index("blue"), 1)  # closed
    image[5, 5] = (OBJECT_TO_IDX["key"], COLORS.index("green"), 2)  # a key is never a door
    assert locked_doors({"image": image}) == {"red"}
    from lwm.envs.language import facing
    from lwm.goals import ObjRef

    assert facing({"image": image}) is None
    image[3, 5] = (OBJECT_TO_IDX["ball"], COLORS.index("grey"), 0)
    assert facing({"image": image}) == ObjRef("ball", "grey")


def test_a_locked_door_says_so_when_faced_and_when_toggled_without_its_key():
    env = make_env("lwm/BabyAI-MixedLocal-v0")
    seed = next(s for s in range(100) if env.reset(seed=s)[0]["mission"].startswith("open"))
    env.reset(seed=seed)
    base = env.unwrapped
    door = next(o for o in base.grid.grid if o is not None and o.type == "door" and o.is_locked)
    # stand the agent in front of the door, facing it, from the cell beside it in the agent's room
    x, y = door.cur_pos
    base.agent_pos, base.agent_dir = np.array((x - 1, y)), 0
    events = env.step(base.actions.left)[-1]["events"] + env.step(base.actions.right)[-1]["events"]
    assert f"the {door.color} door is locked" in events
    toggled = env.step(base.actions.toggle)[-1]["events"]
    assert toggled == [f"the {door.color} door is locked"] and door.is_locked


def test_carried_reads_what_the_agent_really_holds():
    from lwm.envs.language import carried
    from lwm.goals import ObjRef

    env = make_env("BabyAI-PickupLoc-v0")
    colours = set()
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        assert carried(obs) is None
        bot = BabyAIBot(env.unwrapped)
        for _ in range(64):
            obs, _, term, trunc, _ = env.step(bot.replan())
            if term or trunc:
                break
        held = env.unwrapped.carrying
        assert held is not None
        assert carried(obs) == ObjRef(held.type, held.color)
        colours.add(held.color)
    assert len(colours) >= 3  # not only colours whose index agrees in both orders


def test_beside_front_is_where_a_drop_puts_next_to():
    from lwm.envs.language import beside_front
    from lwm.goals import COLORS, ObjRef

    image = np.zeros((7, 7, 3), np.uint8)
    image[..., 0] = OBJECT_TO_IDX["empty"]
    obs = {"image": image}
    red_box = ObjRef("box", "red")
    assert not beside_front(obs, red_box)
    image[2, 4] = (OBJECT_TO_IDX["box"], COLORS.index("red"), 0)  # diagonal: not next to
    assert not beside_front(obs, red_box)
    for x, y in ((2, 5), (4, 5), (3, 4)):  # left of, right of and beyond the cell in front
        image[x, y] = (OBJECT_TO_IDX["box"], COLORS.index("red"), 0)
        assert beside_front(obs, red_box) and beside_front(obs, ObjRef("box"))
        assert not beside_front(obs, ObjRef("box", "blue"))
        image[x, y] = (OBJECT_TO_IDX["empty"], 0, 0)
    image[3, 4] = (OBJECT_TO_IDX["box"], COLORS.index("red"), 0)
    image[3, 5] = (OBJECT_TO_IDX["ball"], COLORS.index("grey"), 0)  # the front cell is taken
    assert not beside_front(obs, red_box)


def test_the_bot_drops_a_put_only_where_drop_is_not_forbidden():
    """On the BabyAI bot's PutNextLocal episodes, the drop that achieves the put is allowed by
    `forbidden_actions`, and carrying the object elsewhere the drop is ruled out."""
    from lwm.envs.language import forbidden_actions

    env = make_env("BabyAI-PutNextLocal-v0")
    ruled_out = 0
    for seed in range(8):
        obs, _ = env.reset(seed=seed)
        (goal,) = instr_goals(env.unwrapped.instrs)
        bot = BabyAIBot(env.unwrapped)
        for _ in range(128):
            action = bot.replan()
            forbidden = forbidden_actions(goal, obs)
            obs, _, term, trunc, info = env.step(action)
            if goal_achieved(goal, info):
                assert action == env.unwrapped.actions.drop and "drop" not in forbidden
            elif env.unwrapped.carrying is not None:
                ruled_out += forbidden == {"drop"}
            if term or trunc:
                break
        assert goal_achieved(goal, info)
    assert ruled_out > 8  # the object is carried for several steps of every episode


@pytest.mark.parametrize("env_id", ["BabyAI-PickupLoc-v0", "BabyAI-PutNextLocal-v0",
                                    "BabyAI-UnlockLocal-v0"])
def test_noop_actions_change_nothing_in_the_env(env_id):
    from lwm.envs.language import ACTION_NAMES, noop_actions

    env = make_env(env_id)
    rng = np.random.default_rng(0)
    taken = set()
    for seed in range(8):
        obs, _ = env.reset(seed=seed)
        for _ in range(80):  # random play: every action, noop or not
            action = int(rng.integers(6))
            noop = ACTION_NAMES[action] in noop_actions(obs)
            pose = (tuple(env.unwrapped.agent_pos), env.unwrapped.agent_dir)
            grid = env.unwrapped.grid.encode().copy()
            after, _, terminated, truncated, _ = env.step(action)
            if noop:
                taken.add(ACTION_NAMES[action])
                assert (tuple(env.unwrapped.agent_pos), env.unwrapped.agent_dir) == pose
                assert np.array_equal(env.unwrapped.grid.encode(), grid)
                assert np.array_equal(after["carrying"], obs["carrying"])
            obs = after
            if terminated or truncated:
                break
    assert taken == {"forward", "pickup", "drop", "toggle"}
    assert "left" not in noop_actions(obs) and "done" in noop_actions(obs)
