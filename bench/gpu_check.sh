#!/usr/bin/env bash
# Throughput of kdfine against the conventional pipeline on one CUDA GPU, in under 5 minutes.
#
#   bench/gpu_check.sh                       # CIFAR-10 archive found beside the checkout, or:
#   CIFAR_ARCHIVE=/path/cifar10-jpeg.tar.gz bench/gpu_check.sh
#   CIFAR_DIR=/path/extracted bench/gpu_check.sh --rounds 7     # extra arguments go to throughput.py
#
# kdfine runs with its CUDA defaults (bf16 autocast, channels_last); the conventional pipeline
# (ImageFolder + PIL transforms + DataLoader, 2 workers) in fp32 on the same GPU. The archive is
# extracted once into $KDFINE_CACHE/cifar10-jpeg (default ~/.cache/kdfine) when no tree is given.
# Prints the device, JSON lines and the Markdown table; the target is train-teacher wrn-16-2 >= 3x.
set -euo pipefail
cd "$(dirname "$0")/.."

source bench/find_python.sh gpu_check
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')) sees no CUDA device" >&2
  exit 4
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

data_args=()
if [[ -n "${CIFAR_DIR:-}" ]]; then
  data_args=(--data "$CIFAR_DIR")
elif [[ -n "${CIFAR_ARCHIVE:-}" ]]; then
  data_args=(--archive "$CIFAR_ARCHIVE")
fi

# About 10 s per pipeline and model after start-up; the JPEG decode into kdfine's cache happens once.
start=$(date +%s)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 290 "$PY" bench/throughput.py --device cuda \
  --models 'wrn-16-2,wrn-16-1,wrn-16-2->wrn-16-1' --steps 60 --rounds 5 --warmup 1 \
  --features wrn-16-2 --feature-images 20000 ${data_args[@]+"${data_args[@]}"} "$@"
echo "gpu_check: finished in $(( $(date +%s) - start )) s" >&2
