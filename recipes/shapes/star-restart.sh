#!/usr/bin/env bash
# The bundled default model since 2026-12-08 (docs/studies.md, "A third round"): three warm-restart rounds.
# Round 1 is recipes/shapes/reading-restart.sh's teacher (the default model of commit 61882a5 trained again
# on reading-order captions). Rounds 2 and 3 each train the previous round's teacher 3,000 steps more, on
# 100,000 other fresh images (seeds 2 and 3) whose captions name stars and crosses more often
# (`--shape-weights star=2,cross=2`: the two shapes the models draw worst). Round 3's teacher is then
# distilled as before.
# Usage (from a git checkout):  bash recipes/shapes/star-restart.sh      # ~4.5 h on a 2-core CPU
# Every stage resumes: rerun the same command after an interruption. Environment knobs:
#   RUNS=runs/star-restart  DEST=src/rectiflow/assets/default  OMP_NUM_THREADS=2
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/star-restart}
export DEST=${DEST:-src/rectiflow/assets/default}
# each round's teacher, named here: inside a round's `RUNS=... INIT=...` prefix RUNS is already the round's
TEACHER=train/export/bundle/transformer.safetensors
ROUND1="$RUNS/round1/$TEACHER"
ROUND2="$RUNS/round2/$TEACHER"
# round 1: the reading-order restart of the model at commit 61882a5, its teacher only
RUNS="$RUNS/round1" TEACHER_ONLY=1 bash recipes/shapes/reading-restart.sh
# round 2: from that teacher (the autoencoder again from commit 61882a5), on seed 2's images, stars and
# crosses weighted 2; its teacher only
RUNS="$RUNS/round2" INIT="$ROUND1" SEED=2 SHAPE_WEIGHTS=star=2,cross=2 TEACHER_ONLY=1 \
  bash recipes/shapes/reading-restart.sh
# round 3: the same again from round 2's teacher, on seed 3's images, then distilled and shipped
RUNS="$RUNS/round3" INIT="$ROUND2" SEED=3 SHAPE_WEIGHTS=star=2,cross=2 \
  RECIPE="bash recipes/shapes/star-restart.sh" \
  START="The teacher of \`bash recipes/shapes/reading-restart.sh\` (the default model of commit 61882a5
   trained again on reading-order captions; that recipe's steps 1-2, its scores in docs/studies.md),
   trained once more the same way on seed 2's images with \`--shape-weights star=2,cross=2\` (this
   recipe's round 2), is the starting point, with the autoencoder of commit 61882a5." \
  bash recipes/shapes/reading-restart.sh
