#!/usr/bin/env bash
# Teach the bundled default model a new shape, the heart, with a rank-16 LoRA (docs/lora.md):
#   200 hearts + 100 shapes-world prior images (render.py) -> latent/MiniLM cache with the bundle's own
#   autoencoder -> `rectiflow train` with a [lora] section (lora-heart.toml) -> kohya + diffusers files ->
#   heart score and shapes-benchmark seen split, before and after (evaluate.py).
# Usage (from anywhere):  bash recipes/lora-heart/run.sh      # ~20 CPU minutes (training ~13)
# Every stage resumes: rerun the same command after an interruption. Knobs: RUNS=runs/lora-heart,
# OMP_NUM_THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/lora-heart}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
RF=(python -m rectiflow)
if [ ! -f "$RUNS/data/metadata.jsonl" ]; then
  python recipes/lora-heart/render.py "$RUNS/data" --hearts 200 --prior 100
fi
"${RF[@]}" cache --data "$RUNS/data" --caption-column text --caption-column captions \
  --autoencoder src/rectiflow/assets/default/ae.safetensors --text-encoder minilm --size 64 \
  --out "$RUNS/cache" --batch-size 64
OVERRIDES=(data.cache="$RUNS/cache" train.out_dir="$RUNS/train")
if [ ! -f "$RUNS/train/export/lora-kohya.safetensors" ]; then
  resume=(); if ls -d "$RUNS/train/checkpoints"/step-* >/dev/null 2>&1; then resume=(--resume); fi
  "${RF[@]}" train recipes/lora-heart/lora-heart.toml "${OVERRIDES[@]}" "${resume[@]}"
fi
"${RF[@]}" lora info "$RUNS/train/export/lora-kohya.safetensors"
LORA="$RUNS/train/export/lora-kohya.safetensors"
python recipes/lora-heart/evaluate.py "$RUNS/eval-before" --seen            # the bundle's defaults (CFG 1)
python recipes/lora-heart/evaluate.py "$RUNS/eval-after" --seen --lora "$LORA"
python recipes/lora-heart/evaluate.py "$RUNS/eval-before-cfg2" --cfg 2      # hearts only, with guidance
python recipes/lora-heart/evaluate.py "$RUNS/eval-after-cfg2" --cfg 2 --lora "$LORA"
