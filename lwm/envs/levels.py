"""BabyAI levels of lwm's own, built from minigrid's level-generation and verifier classes."""

from __future__ import annotations

from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel
from minigrid.envs.babyai.core.verifier import (
    AfterInstr,
    BeforeInstr,
    GoToInstr,
    ObjDesc,
    PickupInstr,
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
