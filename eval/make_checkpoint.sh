#!/usr/bin/env bash
# Train a `small` mamba2 world model by the Dyna loop on BabyAI GoToLocal (seed 0, 1 thread):
# 3000 episodes with 100 updates per 100 episodes, then 5000 more updates, and copy it into
# lwm/resources/checkpoints/babyai-goto.
#
# The checkpoint shipped now predates goal-match maps, Double-DQN targets and Q-policy
# collection: it was trained with this script at commit 901867b (exploration episodes only, no
# maps). To reproduce it exactly: `git worktree add /tmp/lwm-901867b 901867b` and run this script
# there. At HEAD the script trains the current recipe, which replaces the shipped model only once
# it beats it under the agent's default planner (see issue #5's notes).
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
