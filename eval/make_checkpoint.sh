#!/usr/bin/env bash
# Train the shipped GoToLocal world model: a `small` mamba2 model, Dyna loop on BabyAI GoToLocal
# (seed 0, 1 thread), in two phases of one run directory:
#   1. 3000 episodes, 100 updates per 100 episodes (exploration for 200, then mostly the model's
#      own epsilon-greedy Q policy);
#   2. resumed to 5000 episodes with 150 updates per 100 episodes: 6000 updates in all.
# Then copy it into lwm/resources/checkpoints/babyai-goto with agent.json, the planner measured
# best for it (epsilon-greedy Q; see that file and issue #5's notes).
#
# The shipped file was trained by phase 1 at commit 7c9964c and phase 2 at commit 50e04c7. Later
# commits compute the goal heads' scores in a different floating-point order, so at HEAD the same
# commands train the same recipe, not bit-identical weights (`--goal-vocab all` keeps the
# relabelling vocabulary of then: every concrete goal, where `lwm train` now defaults to the
# suite's own). On a 2-core machine shared with other
# jobs, phase 1 took 104 min and phase 2 about 35 min.
# Usage: bash eval/make_checkpoint.sh [run-dir]     (resumable: run it again after a kill)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/train/babyai-goto-mamba2}
COMMON=(--suite babyai-goto --preset small --backbone mamba2 --seed 0 --threads 1
        --collect-per-iter 100 --goal-vocab all --run-dir "$RUN")
.venv/bin/lwm train "${COMMON[@]}" --episodes 3000 --updates-per-iter 100
.venv/bin/lwm train "${COMMON[@]}" --episodes 5000 --updates-per-iter 150
DEST=lwm/resources/checkpoints/babyai-goto
mkdir -p "$DEST"
cp "$RUN/model/config.json" "$RUN/model/model.safetensors" "$DEST/"
cp "$RUN/trainer.json" "$DEST/trainer.json"
cat > "$DEST/agent.json" <<'EOF'
{
  "planner": "greedy",
  "planner_cfg": {"epsilon": 0.3},
  "measured": "python eval/agent.py lwm/resources/checkpoints/babyai-goto --planner P --episodes 200 (GoToLocal, held-out seeds): greedy epsilon 0.3 90.5% [85.6, 93.8]; greedy 75.5% [69.1, 80.9]; MPPI 256x8x3 on 50 episodes is below greedy epsilon 0.3 (see issue #5's notes)"
}
EOF
du -h "$DEST"/*
