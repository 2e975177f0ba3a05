"""The canonical goal grammar: round trips, patterns, clear errors."""

import pytest

from lwm.goals import (
    Goal,
    GoalTextError,
    ObjRef,
    acting_goal,
    all_concrete_goals,
    keeps_carried,
    parse_goal,
)


def test_every_concrete_goal_round_trips():
    goals = all_concrete_goals()
    assert len(goals) == len(set(goals)) == 480
    for goal in goals:
        assert goal.is_concrete
        assert parse_goal(goal.text) == goal


@pytest.mark.parametrize(
    "text",
    [
        "go to the ball",
        "pick up the key on your left",
        "open the door in front of you",
        "put the box behind you next to the red ball",
    ],
)
def test_patterns_round_trip_and_are_not_concrete(text):
    goal = parse_goal(text)
    assert goal.text == text and not goal.is_concrete


def test_pattern_matching():
    pattern = parse_goal("put the ball next to the blue key")
    assert pattern.matches(parse_goal("put the red ball next to the blue key"))
    assert not pattern.matches(parse_goal("put the red ball next to the green key"))
    assert not pattern.matches(parse_goal("pick up the red ball"))
    located = parse_goal("go to the key on your right")
    concrete = parse_goal("go to the grey key")
    assert not located.matches(concrete)
    assert located.matches(concrete, obj_locs={"right", "front"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("go to the moon", "not a canonical goal text"),
        ("Go To The Red Ball", "not a canonical goal text"),
        ("open the red ball", "only doors can be opened"),
        ("pick up the red door", "cannot pick up the red door"),
    ],
)
def test_bad_goals_raise_clear_errors(text, message):
    with pytest.raises(GoalTextError, match=message):
        parse_goal(text)


def test_bad_object_refs():
    with pytest.raises(GoalTextError, match="unknown colour 'pink'"):
        ObjRef("ball", "pink")
    with pytest.raises(GoalTextError, match="takes a target"):
        Goal("go to", ObjRef("ball", "red"), ObjRef("key", "blue"))


def test_a_put_of_an_object_not_in_hand_starts_with_picking_it_up():
    put = parse_goal("put the red ball next to the blue box")
    assert acting_goal(put, None).text == "pick up the red ball"
    # Hands full of something else: drop it first, then pick up.
    assert acting_goal(put, ObjRef("key", "red")).text == "drop the red key"
    assert acting_goal(put, ObjRef("ball", "green")).text == "drop the green ball"
    assert acting_goal(put, ObjRef("ball", "red")) == put
    any_ball = parse_goal("put the ball on your left next to the blue box")
    assert acting_goal(any_ball, ObjRef("ball", "grey")) == any_ball  # the location can't be seen
    assert acting_goal(any_ball, None).text == "pick up the ball on your left"
    go = parse_goal("go to the red ball")
    assert acting_goal(go, None) == go and acting_goal(go, ObjRef("key", "red")) == go


def test_a_pick_up_with_something_else_in_hand_starts_with_dropping_it():
    ball = parse_goal("pick up the red ball")
    assert acting_goal(ball, None) == ball
    assert acting_goal(ball, ObjRef("ball", "red")) == ball  # in hand: nothing to drop
    assert acting_goal(ball, ObjRef("box", "red")).text == "drop the red box"
    any_key = parse_goal("pick up the key behind you")
    assert acting_goal(any_key, ObjRef("key", "grey")) == any_key  # its location can't be seen
    assert acting_goal(any_key, ObjRef("ball", "grey")).text == "drop the grey ball"


def test_opening_a_door_starts_with_its_key_when_locked_then_going_to_it():
    red_door, door = parse_goal("open the red door"), ObjRef("door", "red")
    assert acting_goal(red_door, None, facing=door) == red_door  # faced, not seen locked
    assert acting_goal(red_door, None).text == "go to the red door"
    assert acting_goal(red_door, None, facing=ObjRef("door", "blue")).text == "go to the red door"
    assert acting_goal(red_door, None, {"blue"}, door) == red_door
    assert acting_goal(red_door, None, {"red"}, door).text == "pick up the red key"
    assert acting_goal(red_door, ObjRef("key", "blue"), {"red"}).text == "drop the blue key"
    assert acting_goal(red_door, ObjRef("key", "red"), {"red"}).text == "go to the red door"
    assert acting_goal(red_door, ObjRef("key", "red"), {"red"}, door) == red_door
    any_door = parse_goal("open the door")
    assert acting_goal(any_door, None, {"grey"}).text == "pick up the grey key"
    grey_key = ObjRef("key", "grey")
    assert acting_goal(any_door, grey_key, {"grey"}).text == "go to the grey door"
    # Faced with its key in hand, "the door" is planned as the door that key opens.
    assert acting_goal(any_door, grey_key, {"grey"}, ObjRef("door", "grey")).text == \
        "open the grey door"
    assert acting_goal(any_door, None, {"grey", "red"}).text == "go to the door"
    assert acting_goal(any_door, None, {"grey", "red"}, door) == any_door  # which key: unknown
    left = parse_goal("open the door on your left")
    assert acting_goal(left, None).text == "go to the door on your left"


def test_the_key_of_the_door_to_open_is_kept_in_hand():
    red_door, any_door = parse_goal("open the red door"), parse_goal("open the door")
    red_key, blue_key = ObjRef("key", "red"), ObjRef("key", "blue")
    assert keeps_carried(red_door, red_key)
    assert not keeps_carried(red_door, blue_key)  # the wrong key may go
    assert not keeps_carried(red_door, ObjRef("ball", "red")) and not keeps_carried(red_door, None)
    assert keeps_carried(any_door, red_key, {"red"})  # the one locked door seen is red
    assert not keeps_carried(any_door, red_key)  # no locked door seen: which door is unknown
    assert not keeps_carried(any_door, red_key, {"red", "blue"})
    assert not keeps_carried(parse_goal("pick up the red key"), red_key)
    assert not keeps_carried(parse_goal("put the red key next to the blue ball"), red_key)
