#!/usr/bin/env bash
# A second warm-restart round (docs/studies.md, "A second round, stars and crosses shown more often"): the
# teacher of recipes/shapes/reading-restart.sh trained 3,000 steps more, on 100,000 other fresh images
# (seed 2) whose captions name stars and crosses more often (`--shape-weights star=2,cross=2`: the two
# shapes the models draw worst), then distilled as before.
# Usage (from a git checkout):  bash recipes/shapes/star-restart.sh      # ~3.5 h on a 2-core CPU
# Every stage resumes: rerun the same command after an interruption. Environment knobs:
#   RUNS=runs/star-restart  DEST=src/rectiflow/assets/default  OMP_NUM_THREADS=2
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/star-restart}
export DEST=${DEST:-src/rectiflow/assets/default}
# round 1: the reading-order restart of the model at commit 61882a5, its teacher only
RUNS="$RUNS/round1" TEACHER_ONLY=1 bash recipes/shapes/reading-restart.sh
ROUND1="$RUNS/round1/train/export/bundle/transformer.safetensors"
# round 2: from that teacher (the autoencoder again from commit 61882a5), on seed 2's images, stars and
# crosses weighted 2
RUNS="$RUNS/round2" INIT="$ROUND1" SEED=2 SHAPE_WEIGHTS=star=2,cross=2 \
  RECIPE="bash recipes/shapes/star-restart.sh" \
  START="The teacher of \`bash recipes/shapes/reading-restart.sh\` (the default model of commit 61882a5
   trained again on reading-order captions; that recipe's steps 1-2, its scores in docs/studies.md) is the
   starting point, with the autoencoder of commit 61882a5." \
  bash recipes/shapes/reading-restart.sh
