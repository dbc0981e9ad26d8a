#!/usr/bin/env bash
# Regenerates the example pictures in docs/ from runs on the embedded digits data (CPU, a few
# minutes). Needs kdfine with the plot extra on PATH: pip install -e '.[plot]'.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/docs}
mkdir -p "$RUNS"

# a teacher, and two students distilled from it with MSE on logits and with KL (tau 4)
kdfine train-teacher --epochs 20 --out "$RUNS/teacher.safetensors" --log "$RUNS/teacher.jsonl" -q
kdfine distill --teacher "$RUNS/teacher.safetensors" --arch cnn-16 --loss mse --epochs 20 \
  --out "$RUNS/student-mse.safetensors" --log "$RUNS/student-mse.jsonl" -q
kdfine distill --teacher "$RUNS/teacher.safetensors" --arch cnn-16 --loss kl --tau 4 --epochs 20 \
  --out "$RUNS/student-kl.safetensors" --log "$RUNS/student-kl.jsonl" -q
kdfine plot-log "$RUNS/teacher.jsonl" "$RUNS/student-mse.jsonl" "$RUNS/student-kl.jsonl" \
  -o docs/curves.png --title "digits: teacher cnn, students cnn-16 (MSE and KL)"

# a teacher trained with 40% symmetric label noise: its calibration and errors, then FINE
kdfine train-teacher --label-noise sym:0.4 --epochs 8 --out "$RUNS/noisy.safetensors" -q
kdfine eval --model "$RUNS/noisy.safetensors" --plot docs/eval.png
kdfine eval --model "$RUNS/noisy.safetensors" --split train --dump-features "$RUNS/features.npy" -q
kdfine detect-noise --features "$RUNS/features.npy" --out "$RUNS/clean_idx.csv" --plot docs/detect-noise.png \
  --review "$RUNS/review.html"
# the review page as headless Chromium shows it (docs/cleaning.md)
"${PYTHON:-python3}" scripts/review_screenshot.py "$RUNS/review.html" docs/review.png

kdfine info "$RUNS/student-mse.safetensors"
