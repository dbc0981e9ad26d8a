#!/usr/bin/env bash
# The first rows of the paper-scale logit-loss comparison (bench/reproduce_kd.py --scale paper
# --claims compare) on one CUDA GPU, within a 15-minute device budget: the WRN-28-4 teacher and
# WRN-16-2 students with the KD paper's recipe (SGD 0.1 Nesterov, wd 5e-4 not on BatchNorm/biases,
# batch 128, crop+flip, fp32, x0.1 at 50% and 75% of the epochs, alpha 1), the epochs cut to fit,
# one seed, the columns in the order of COLUMNS below (MSE and the two later losses first).
#
#   CIFAR100_ROOT=DIR bench/gpu_kd_losses.sh           # DIR holds torchvision's cifar-100-python/
#   bench/gpu_kd_losses.sh                             # no CIFAR-100: the CIFAR-10 JPEG archive
#   CIFAR_ARCHIVE=/path/cifar10-jpeg.tar.gz bench/gpu_kd_losses.sh
#   bench/gpu_kd_losses.sh --dry-run                   # print the kdfine commands; no GPU needed
#
# Settings (environment): TEACHER_EPOCHS (15), EPOCHS (8), COLUMNS (run keys, in order), BUDGET_S
# (480: the training stops cleanly after this many seconds, SIGINT to every run, and the tables are
# printed from the runs that finished; the rest of the 15 minutes is the machine's start-up), WORK
# (checkpoints; default a temporary folder). Extra arguments go to reproduce_kd.py. When $OUT is set
# (the device tool), results.md, runs.jsonl and the per-epoch logs are copied there. DEVICE (cuda)
# is passed to every run.
#
# The device cannot download: without CIFAR100_ROOT the script runs the paper's networks and recipe
# on CIFAR-10 (all 50,000 training images, 10% held out for validation) and its header says so; the
# published numbers it prints are CIFAR-100's, for the teacher/student pairs they name.
set -euo pipefail
cd "$(dirname "$0")/.."

TEACHER_EPOCHS=${TEACHER_EPOCHS:-15}
EPOCHS=${EPOCHS:-8}
COLUMNS=${COLUMNS:-mse,dkd,kl-std,kl-3,ce,kl-inf,kl-1,kl-5,kl-20}
BUDGET_S=${BUDGET_S:-480}
DRY_RUN=0
args=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else args+=("$a"); fi
done

source bench/find_python.sh gpu_kd_losses
DEVICE=${DEVICE:-cuda}  # cpu: only to try the script's own flow (budget, report) on a machine without a GPU
if [[ $DRY_RUN == 0 && $DEVICE == cuda* ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_kd_losses: $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')) sees no CUDA device" >&2
  exit 4
fi

WORK=${WORK:-$(mktemp -d -t kdfine-kd-gpu.XXXXXX)}
mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KDFINE_CACHE=${KDFINE_CACHE:-$WORK/cache}

# Data: CIFAR-100 from a local torchvision copy, else the CIFAR-10 JPEG tree (extracted once).
data=()
if [[ -n "${CIFAR100_ROOT:-}" ]]; then
  if [[ ! -d "$CIFAR100_ROOT/cifar-100-python" ]]; then
    echo "gpu_kd_losses: CIFAR100_ROOT=$CIFAR100_ROOT holds no cifar-100-python/ (torchvision's CIFAR-100 files)" >&2
    exit 3
  fi
  data=(--data-root "$CIFAR100_ROOT")
  echo "gpu_kd_losses: data CIFAR-100 from $CIFAR100_ROOT" >&2
else
  tree=${CIFAR_DIR:-}
  if [[ -z "$tree" ]]; then
    archive=${CIFAR_ARCHIVE:-}
    for candidate in shared/data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
      [[ -z "$archive" && -f "$candidate" ]] && archive=$candidate
    done
    if [[ -z "$archive" || ! -f "$archive" ]]; then
      echo "gpu_kd_losses: no data: set CIFAR100_ROOT (torchvision's CIFAR-100), CIFAR_DIR (an extracted" \
           "CIFAR-10 JPEG tree) or CIFAR_ARCHIVE (cifar10-jpeg.tar.gz)" >&2
      exit 3
    fi
    tree=$KDFINE_CACHE/cifar10-jpeg
    if [[ ! -d "$tree/train" ]]; then
      mkdir -p "$tree" && tar xzf "$archive" -C "$tree"
    fi
  fi
  data=(--data "imagefolder:$tree")
  echo "gpu_kd_losses: CIFAR-100 not given (CIFAR100_ROOT): the paper's networks and recipe on CIFAR-10 ($tree)" >&2
fi

run=("$PY" bench/reproduce_kd.py --scale paper --claims compare --seeds 1 --teacher-epochs "$TEACHER_EPOCHS"
     --epochs "$EPOCHS" --columns "$COLUMNS" --device "$DEVICE" --workdir "$WORK/runs" ${data[@]+"${data[@]}"}
     ${args[@]+"${args[@]}"})
if [[ $DRY_RUN == 1 ]]; then
  "${run[@]}" --dry-run
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
start=$(date +%s)
# timeout signals its whole process group: each kdfine run stops at a batch boundary (exit 130)
status=0
timeout --signal=INT --kill-after=30 "$BUDGET_S" "${run[@]}" || status=$?
if [[ $status == 124 ]]; then
  echo "gpu_kd_losses: stopped after ${BUDGET_S} s; the tables hold the runs that finished" >&2
  "${run[@]}" --report-only
  status=0
elif [[ $status != 0 ]]; then
  echo "gpu_kd_losses: reproduce_kd.py failed (exit $status); its stderr above says which run" >&2
fi
echo "gpu_kd_losses: finished in $(( $(date +%s) - start )) s; runs in $WORK/runs" >&2
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$WORK/runs/results.md" "$WORK/runs/runs.jsonl" "$OUT/" 2>/dev/null || true
  cp "$WORK"/runs/*.epochs.jsonl "$OUT/" 2>/dev/null || true
fi
exit "$status"
