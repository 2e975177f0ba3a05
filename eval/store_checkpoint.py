"""Store a trained world model for shipping (what eval/make_*checkpoint.sh run last):

    python eval/store_checkpoint.py RUN DEST --suite SUITE

writes DEST/config.json and DEST/model.safetensors in half precision (a `small` model: 4.7 MB;
`WorldModel.from_pretrained` loads it back in float32), copies RUN/trainer.json (the recipe and
its wall time) and writes DEST/agent.json: greedy Q with repeat penalty 0.1, the settings
measured best for every shipped model, marked as not measured for these weights until
`python eval/agent.py DEST --suite SUITE` has been run and its result written there.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from lwm.agent import AGENT_SETTINGS
from lwm.models.world_model import WorldModel, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory (or a model directory)")
    parser.add_argument("dest", type=Path, help="where to write the checkpoint")
    parser.add_argument("--suite", required=True, help="the suite its agent.json names")
    args = parser.parse_args()
    WorldModel.from_pretrained(model_dir(args.run)).save_pretrained(args.dest,
                                                                     dtype=torch.float16)
    if (args.run / "trainer.json").is_file():
        shutil.copy(args.run / "trainer.json", args.dest / "trainer.json")
    measured = (f"not measured for these weights: run python eval/agent.py {args.dest} --suite "
                f"{args.suite} --episodes 200 (the shipped weights: README)")
    settings = {"planner": "greedy", "planner_cfg": {"epsilon": 0.0, "repeat_penalty": 0.1},
                "measured": measured}
    (args.dest / AGENT_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    print(f"stored {args.run} in half precision in {args.dest}")


if __name__ == "__main__":
    main()
