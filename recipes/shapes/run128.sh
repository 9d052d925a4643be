#!/usr/bin/env bash
# The 128 px shapes-world model on one GPU, with rectiflow's own commands:
#   the 64 px recipe's autoencoder (recipes/shapes/run.sh, stages 1-2) fine-tuned on 128 px images ->
#   shapes-world images at 128 px -> latent + MiniLM caches -> transformer (configs/shapes128.toml: bf16
#   autocast on cuda, batch 512) -> eval -> bundle (only with FINALIZE=1; DEST as in run.sh).
# Usage:  bash recipes/shapes/run128.sh        (needs runs/shapes/ae from run.sh, or AE=<weights at 128 px>)
# Every stage resumes. Knobs: RUNS=runs/shapes128  N_IMAGES=100000  WORKERS=16  DEVICE=cuda
#   STEPS=<transformer steps, default configs/shapes128.toml's>  AE=<skip the fine-tune, use these weights>
#   TEXT_FROM=<a cache of the same captions: reuse its MiniLM embeddings, no text encoder needed>
#   EXTRA="<more config overrides>"  CFG=3.0  FINALIZE=1 DEST=src/rectiflow/assets/default
#   HARDWARE="<where it trained, for the model card>"  EVAL_ARGS="<more eval options, e.g. --limit 2>"
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/shapes128}
N_IMAGES=${N_IMAGES:-100000}
WORKERS=${WORKERS:-16}
DEVICE=${DEVICE:-cuda}
CFG=${CFG:-3.0}
# shellcheck source=recipes/shapes/stage.sh
source recipes/shapes/stage.sh

# 1. training images: the shapes world at 128 px (the same scenes and captions as run.sh's 64 px set: the
#    world's geometry is relative to the canvas)
if [ ! -f "$RUNS/data/metadata.jsonl" ]; then
  stage data rectiflow data shapes --out "$RUNS/data" --n "$N_IMAGES" --size 128 --seed 0 --workers "$WORKERS"
fi
# 2. autoencoder: the 64 px one scored 0.94 on 64 px reconstructions but 0.865 at 128 px (colour drifting
#    inside shapes larger than anything it was trained on), so it trains on for 1000 steps on 64 px crops of
#    128 px images (a warm restart of its step-5000 checkpoint: lr 2e-3 with the cosine at 5000/6000 steps,
#    i.e. 3.2e-4 -> 2e-4). train-ae runs on the CPU (~8 min on 2 cores).
if [ -z "${AE:-}" ]; then
  AE="$RUNS/ae/ae.safetensors"
  if [ ! -f "$RUNS/ae/report.json" ]; then
    mkdir -p "$RUNS/ae/checkpoints"
    last=$(ls -d runs/shapes/ae/checkpoints/step-* | sort | tail -1)
    cp -r "$last" "$RUNS/ae/checkpoints/"
    stage autoencoder-128 rectiflow train-ae --data "$RUNS/data" --out "$RUNS/ae" \
      --preset '{"ch": 16, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "norm_groups": 8}' --size 128 \
      --crop 64 --batch-size 32 --max-images 30000 --checkpoint-every 250 --resume --steps 6000 --lr 2e-3
  fi
  rectiflow eval ceiling --autoencoder "$AE" --size 128 --out "$RUNS/ae/ceiling"
fi
# 3. precomputed latents (on DEVICE) and MiniLM embeddings of both caption fields
TEXT=(--text-encoder minilm)
if [ -n "${TEXT_FROM:-}" ]; then TEXT=(--text-from "$TEXT_FROM"); fi
stage cache rectiflow cache --data "$RUNS/data" --caption-column text --caption-column captions \
  --autoencoder "$AE" "${TEXT[@]}" --size 128 --out "$RUNS/cache" --batch-size 256 --device "$DEVICE"
# 4. the transformer
OVERRIDES=(model.autoencoder="$AE" data.cache="$RUNS/cache" train.out_dir="$RUNS/train" train.device="$DEVICE")
if [ -n "${STEPS:-}" ]; then OVERRIDES+=(train.steps="$STEPS"); fi
# shellcheck disable=SC2206
if [ -n "${EXTRA:-}" ]; then OVERRIDES+=($EXTRA); fi
resume=(); if ls -d "$RUNS/train/checkpoints"/step-* >/dev/null 2>&1; then resume=(--resume); fi
stage transformer rectiflow train configs/shapes128.toml "${OVERRIDES[@]}" "${resume[@]}"
# 5. the benchmark at 1, 2, 4 and 8 Euler steps, both splits; 6. the bundle
# shellcheck disable=SC2086
if [ "${FINALIZE:-0}" = 1 ]; then
  stage eval rectiflow eval shapes --model "$RUNS/train/export/bundle" --steps 1,2,4,8 --sampler euler \
    --cfg "$CFG" --size 128 --out "$RUNS/eval" ${EVAL_ARGS:-}
  stage finalize python recipes/shapes/finalize.py --runs "$RUNS" --cfg "$CFG" --steps 8 \
    --dest "${DEST:-src/rectiflow/assets/default}" --recipe "bash recipes/shapes/run128.sh" \
    --config configs/shapes128.toml --ae "$(dirname "$AE")" ${HARDWARE:+--hardware "$HARDWARE"}
fi
