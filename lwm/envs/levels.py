"""BabyAI levels of lwm's own, built from minigrid's level-generation and verifier classes."""

from __future__ import annotations

from minigrid.envs.babyai.core.roomgrid_level import RejectSampling, RoomGridLevel
from minigrid.envs.babyai.core.verifier import (
    AfterInstr,
    BeforeInstr,
    GoToInstr,
    ObjDesc,
    OpenInstr,
    PickupInstr,
    PutNextInstr,
)


class PickupThenGoToLocal(RoomGridLevel):
    """Two-step missions in one room: "pick up X, then go to Y" or "go to Y after you pick up X".

    The objects are unique in the room (no "a ball" ambiguity) and there are no doors, as in
    BALROG's BabyAI "pick up X then go to Y" tasks. Success is judged by minigrid's own
    `BeforeInstr` / `AfterInstr` verifiers.
    """

    def __init__(self, room_size: int = 8, num_dists: int = 6, **kwargs):
        self.num_dists = num_dists
        super().__init__(num_rows=1, num_cols=1, room_size=room_size, **kwargs)

    def gen_mission(self):
        self.place_agent()
        objs = self.add_distractors(num_distractors=self.num_dists, all_unique=True)
        self.check_objs_reachable()
        first, second = self._rand_subset(objs, 2)
        pickup = PickupInstr(ObjDesc(first.type, first.color))
        goto = GoToInstr(ObjDesc(second.type, second.color))
        if self._rand_bool():
            self.instrs = BeforeInstr(pickup, goto)
        else:
            self.instrs = AfterInstr(goto, pickup)


class MixedLocal(RoomGridLevel):
    """BALROG's five BabyAI tasks in one level: each episode's seed picks one instruction type.

    Mirrors minigrid's `Level_MixedTrainLocal` (from BabyAI-Text, Carta et al. 2023), which the
    BALROG benchmark runs as `BabyAI-MixedTrainLocal-v0/{goto, pickup, open, putnext,
    pick_up_seq_go_to}` with `num_dists=0`, its default here:

    - goto, pickup: one room, the target plus `num_dists` other objects;
    - putnext, pickup-then-goto: one room, the two named objects plus `num_dists` others
      ("pick up X, then go to Y" or "go to Y after you pick up X");
    - open: two rooms joined by a locked door (the mission names its colour, or just "the
      door"), whose key lies in the agent's room with `num_dists` other objects.

    Differences, on purpose: MixedTrainLocal withholds missions naming five (colour, type)
    combinations, and its installed minigrid may not have it; here every combination can occur
    and the task suite's split holds those five out instead. Two-step missions never name the
    same object twice. Success is minigrid's own verifier; the grid is one room wide, or two
    for "open".
    """

    KINDS = ("goto", "pickup", "open", "putnext", "pickup-then-goto")

    def __init__(self, room_size: int = 8, num_dists: int = 0, **kwargs):
        self.num_dists = num_dists
        self.kind = self.KINDS[0]
        # Built two rooms wide (the widest layout); `_gen_grid` narrows it per episode.
        super().__init__(num_rows=1, num_cols=2, room_size=room_size, **kwargs)

    def _gen_grid(self, width, height):
        self.kind = self._rand_elem(self.KINDS)
        self.num_cols = 2 if self.kind == "open" else 1
        self.width = (self.room_size - 1) * self.num_cols + 1
        super()._gen_grid(self.width, height)

    def gen_mission(self):
        if self.kind == "open":
            self._gen_open()
            return
        self.place_agent()
        extra = 1 if self.kind in ("goto", "pickup") else 2
        objs = self.add_distractors(num_distractors=self.num_dists + extra, all_unique=False)
        self.check_objs_reachable()
        if self.kind == "goto":
            obj = self._rand_elem(objs)
            self.instrs = GoToInstr(ObjDesc(obj.type, obj.color))
        elif self.kind == "pickup":
            obj = self._rand_elem(objs)
            self.instrs = PickupInstr(ObjDesc(obj.type, obj.color))
        else:
            first, second = self._rand_subset(objs, 2)
            if (first.type, first.color) == (second.type, second.color):
                raise RejectSampling("both objects of a two-object mission look the same")
            a, b = ObjDesc(first.type, first.color), ObjDesc(second.type, second.color)
            if self.kind == "putnext":
                self.instrs = PutNextInstr(a, b)
            elif self._rand_bool():
                self.instrs = BeforeInstr(PickupInstr(a), GoToInstr(b))
            else:
                self.instrs = AfterInstr(GoToInstr(b), PickupInstr(a))

    def _gen_open(self):
        locked = self._rand_int(0, 2)
        start = 1 - locked
        # Door index 0 is a room's right wall, 2 its left: the wall the two rooms share.
        door, _ = self.add_door(locked, 0, door_idx=2 if locked == 1 else 0, locked=True)
        self.locked_room = self.get_room(locked, 0)
        self.add_object(start, 0, "key", door.color)
        self.add_distractors(start, 0, num_distractors=self.num_dists, all_unique=False)
        self.place_agent(start, 0)
        self.check_objs_reachable()
        self.instrs = OpenInstr(ObjDesc("door", self._rand_elem([None, door.color])))
