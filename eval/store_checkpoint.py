"""Store a trained world model in half precision for shipping (what eval/make_*checkpoint.sh
run last): `python eval/store_checkpoint.py RUN DEST` writes DEST/config.json and
DEST/model.safetensors from RUN (a run directory or a model directory). Half precision halves
the file (a `small` model: 4.7 MB); `WorldModel.from_pretrained` loads it back in float32."""

from __future__ import annotations

import argparse

import torch

from lwm.models.world_model import WorldModel, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run or model directory")
    parser.add_argument("dest", help="where to write the half-precision checkpoint")
    args = parser.parse_args()
    path = WorldModel.from_pretrained(model_dir(args.run)).save_pretrained(
        args.dest, dtype=torch.float16)
    print(f"stored {args.run} in half precision in {path}")


if __name__ == "__main__":
    main()
