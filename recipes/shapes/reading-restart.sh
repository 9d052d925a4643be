#!/usr/bin/env bash
# The bundled default model since 2026-12-07: the previous default (made by recipes/shapes/run.sh, taken from
# git history at BASE_COMMIT) trained again as a plain flow model on 100,000 fresh shapes-world images whose
# two-object captions name the objects in reading order, then distilled as run.sh distils
# (docs/studies.md, "A reading-order warm restart of the shipped model").
# Usage (from a git checkout):  bash recipes/shapes/reading-restart.sh      # ~2 h on a 2-core CPU
# Every stage resumes: rerun the same command after an interruption. Environment knobs:
#   RUNS=runs/reading-restart  DEST=src/rectiflow/assets/default  OMP_NUM_THREADS=2
#   BASE_COMMIT=<the commit whose src/rectiflow/assets/default is the starting point, default 61882a5>
# Knobs for a further round (recipes/shapes/star-restart.sh sets them):
#   INIT=<transformer to start from; default the model at BASE_COMMIT>  START="<its line in the lineage>"
#   SEED=1  SHAPE_WEIGHTS=<e.g. star=2,cross=2; default none>  TEACHER_ONLY=1 (stop after the teacher)
set -euo pipefail
RECIPE=${RECIPE:-"bash recipes/shapes/reading-restart.sh"}
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/reading-restart}
DEST=${DEST:-src/rectiflow/assets/default}
BASE_COMMIT=${BASE_COMMIT:-61882a5}
SEED=${SEED:-1}
SHAPE_WEIGHTS=${SHAPE_WEIGHTS:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# shellcheck source=recipes/shapes/stage.sh
source recipes/shapes/stage.sh

# 0. the starting point: the previous default model (transformer and autoencoder), from git history
BASE="$RUNS/base"
if [ ! -f "$BASE/transformer.safetensors" ]; then
  mkdir -p "$BASE.tmp"
  for f in transformer.safetensors ae.safetensors; do
    git show "$BASE_COMMIT:src/rectiflow/assets/default/$f" > "$BASE.tmp/$f"
  done
  mv "$BASE.tmp" "$BASE"
fi
AE="$BASE/ae.safetensors"
INIT=${INIT:-$BASE/transformer.safetensors}
rectiflow eval ceiling --autoencoder "$AE" --size 64 --out "$RUNS/ae/ceiling"
# 1. fresh images (seed 1; the previous model saw seed 0's), two-object captions in reading order
WEIGHTS=(); if [ -n "$SHAPE_WEIGHTS" ]; then WEIGHTS=(--shape-weights "$SHAPE_WEIGHTS"); fi
if [ ! -f "$RUNS/data/metadata.jsonl" ]; then
  stage data rectiflow data shapes --out "$RUNS/data" --n 100000 --size 64 --seed "$SEED" --workers 2 \
    --caption-order reading "${WEIGHTS[@]}"
fi
stage cache rectiflow cache --data "$RUNS/data" --caption-column text --caption-column captions \
  --autoencoder "$AE" --text-encoder minilm --size 64 --out "$RUNS/cache" --batch-size 64
# 2. the warm restart: the starting weights (INIT; by default the distilled student's) trained again with
#    caption dropout (so CFG works again), 3000 steps of 64 at peak lr 4e-4, cosine to 10%, EMA from step 0
OVERRIDES=(model.init="$INIT" model.autoencoder="$AE" data.cache="$RUNS/cache"
           optim.lr=4e-4 optim.warmup_steps=100 ema.start=0 ema.decay=0.998 train.steps=3000
           train.out_dir="$RUNS/train")
if [ ! -f "$RUNS/train/export/bundle/model.json" ]; then
  if [ ! -f "$INIT" ]; then echo "error: no starting weights at INIT=$INIT" >&2; exit 1; fi
  resume=(); if ls -d "$RUNS/train/checkpoints"/step-* >/dev/null 2>&1; then resume=(--resume); fi
  stage transformer rectiflow train configs/shapes.toml "${OVERRIDES[@]}" "${resume[@]}"
fi
if [ ! -f "$RUNS/eval/report.json" ]; then  # (star-restart.sh reruns this script for its teacher)
  stage eval rectiflow eval shapes --model "$RUNS/train/export/bundle" --steps 4,8 --sampler euler --cfg 3 \
    --size 64 --out "$RUNS/eval"
fi
if [ -n "${TEACHER_ONLY:-}" ]; then exit 0; fi
# 3. the distillation of run.sh (configs/shapes_distill.toml), on the same cache
T="$RUNS/train/export/bundle/transformer.safetensors"
if [ ! -f "$RUNS/distill/export/bundle/model.json" ]; then
  resume=(); if ls -d "$RUNS/distill/checkpoints"/step-* >/dev/null 2>&1; then resume=(--resume); fi
  stage distill rectiflow train configs/shapes_distill.toml model.init="$T" distill.teacher="$T" \
    model.autoencoder="$AE" data.cache="$RUNS/cache" train.out_dir="$RUNS/distill" "${resume[@]}"
fi
stage eval-distilled rectiflow eval shapes --model "$RUNS/distill/export/bundle" --steps 1,2,4,8 \
  --sampler euler --shift 3 --cfg 1.0 --size 64 --out "$RUNS/eval-distilled"
# 4. the bundle in the repo, with a card that names the starting point and the teacher's own scores
score() {  # score STEPS: "seen / held-out" of the teacher's benchmark at STEPS Euler steps
  python -c "import json, sys; r = json.load(open(sys.argv[1]))['results']
print(' / '.join(f\"{r[s][sys.argv[2]]['overall']:.3f}\" for s in ('seen', 'held_out')))" "$RUNS/eval/report.json" "$1"
}
START=${START:-"The previous default model (commit $BASE_COMMIT, \`bash recipes/shapes/run.sh\`: trained from
   scratch, 960k samples, then distilled; its card in git history) is the starting point, with its
   autoencoder."}
MIX=""; if [ -n "$SHAPE_WEIGHTS" ]; then MIX=", captions drawn with \`--shape-weights $SHAPE_WEIGHTS\`"; fi
cat > "$RUNS/lineage.md" <<LINEAGE
1. $START
2. Trained again as a flow model (caption dropout 0.1) on 100,000 fresh images (seed $SEED$MIX) whose
   two-object captions name the objects left to right (\`rectiflow data shapes --caption-order reading\`):
   3,000 steps of 64, lr 4e-4 cosine. This teacher scores $(score 4) at 4 Euler steps and $(score 8) at 8
   (seen / held-out, CFG 3, linear grid).
3. Distilled with \`configs/shapes_distill.toml\` on the same images, as run.sh distils.
LINEAGE
stage finalize python recipes/shapes/finalize.py --runs "$RUNS" --distill "$RUNS/distill" \
  --eval "$RUNS/eval-distilled" --cfg 1.0 --steps 8 --shift 3 --dest "$DEST" --recipe "$RECIPE" \
  --lineage "$RUNS/lineage.md"
