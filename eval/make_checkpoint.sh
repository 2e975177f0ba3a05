#!/usr/bin/env bash
# Reproduce the small world-model checkpoint lwm ships in lwm/resources/checkpoints/babyai-goto:
# a `small` mamba2 world model trained by the Dyna loop on BabyAI GoToLocal (seed 0, 1 thread):
# 3000 exploration episodes with 100 updates per 100 episodes, then 5000 more updates.
# Usage: bash eval/make_checkpoint.sh [run-dir]     (resumable: run it again after a kill)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/train/babyai-goto-mamba2}
.venv/bin/lwm train --suite babyai-goto --preset small --backbone mamba2 --seed 0 --threads 1 \
    --episodes 3000 --collect-per-iter 100 --updates-per-iter 100 \
    --updates-after-collection 5000 --run-dir "$RUN"
DEST=lwm/resources/checkpoints/babyai-goto
mkdir -p "$DEST"
cp "$RUN/model/config.json" "$RUN/model/model.safetensors" "$DEST/"
cp "$RUN/trainer.json" "$DEST/trainer.json"
du -h "$DEST"/*
