#!/usr/bin/env bash
# Exit status of kdfine under torchrun, many times over: N jobs (default 40) of
# `torchrun --standalone --nproc-per-node 2 -m kdfine ...`, two jobs at a time, cycling through
# train-teacher, distill and `eval --dump-features` on the embedded digits data (CPU, gloo).
#
#   bench/torchrun_stress.sh            # 40 jobs
#   bench/torchrun_stress.sh 16         # N jobs
#   PARALLEL=4 bench/torchrun_stress.sh # jobs at a time (default 2)
#
# A job passes when torchrun exits 0, its output file exists and its stderr holds no sign of an
# abnormal end (an abort, a signal, a fatal Python error, torchrun's ChildFailedError). Prints one
# line per failure (with the first such line of its stderr), then the counts and the command; exits
# 1 when any job failed. Logs stay under $STRESS_DIR (default a fresh temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."

N=${1:-40}
PARALLEL=${PARALLEL:-2}
source bench/find_python.sh torchrun_stress
DIR=${STRESS_DIR:-$(mktemp -d -t kdfine-stress.XXXXXX)}
mkdir -p "$DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export KDFINE_CACHE=${KDFINE_CACHE:-$DIR/cache}
ABORT='terminate called|Aborted|SIGABRT|Signal [0-9]+|Fatal Python error|core dumped|ChildFailedError|Segmentation fault'
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m kdfine --)

# The teacher that distill and eval read, trained once in a single process.
TEACHER=$DIR/teacher.safetensors
if ! "$PY" -m kdfine train-teacher --arch mlp --epochs 2 --device cpu --out "$TEACHER" -q >/dev/null 2>"$DIR/teacher.err"; then
  echo "torchrun_stress: the single-process teacher failed:" >&2
  cat "$DIR/teacher.err" >&2
  exit 1
fi

job_args() {  # the kdfine arguments of job $1 and the file it must write
  local i=$1 out
  case $((i % 3)) in
    0) out=$DIR/t$i.safetensors
       echo "train-teacher --arch mlp --epochs 4 --device cpu --out $out -q" ;;
    1) out=$DIR/s$i.safetensors
       echo "distill --teacher $TEACHER --arch mlp --epochs 2 --device cpu --out $out -q" ;;
    2) out=$DIR/f$i.npy
       echo "eval --model $TEACHER --split train --device cpu --dump-features $out -q" ;;
  esac
}

run_job() {  # one torchrun job: DIR/jobI.{err,rc}
  local i=$1
  # shellcheck disable=SC2046 - the arguments hold no spaces
  "${TORCHRUN[@]}" $(job_args "$i") >"$DIR/job$i.out" 2>"$DIR/job$i.err" </dev/null
  echo $? >"$DIR/job$i.rc"
}

start=$(date +%s)
for ((i = 0; i < N; i++)); do
  while (($(jobs -rp | wc -l) >= PARALLEL)); do
    wait -n
  done
  run_job "$i" &
done
wait
elapsed=$(($(date +%s) - start))

declare -A codes=()
failed=0 aborts=0
for ((i = 0; i < N; i++)); do
  rc=$(cat "$DIR/job$i.rc" 2>/dev/null || echo missing)
  codes[$rc]=$((${codes[$rc]:-0} + 1))
  out=$(job_args "$i" | grep -oE -- '--(out|dump-features) [^ ]+' | cut -d' ' -f2)
  sign=$(grep -m1 -E "$ABORT" "$DIR/job$i.err" || true)
  [[ -n "$sign" ]] && aborts=$((aborts + 1))
  if [[ "$rc" != 0 || -n "$sign" || ! -s "$out" ]]; then
    failed=$((failed + 1))
    echo "FAIL job $i (exit $rc): kdfine $(job_args "$i" | cut -d' ' -f1): ${sign:-no output file or non-zero exit}"
  fi
done
summary=""
for rc in $(printf '%s\n' "${!codes[@]}" | sort -n); do
  summary+="exit $rc: ${codes[$rc]}, "
done
echo "torchrun_stress: $N jobs, $PARALLEL at a time, ${elapsed}s; ${summary}abort text in stderr: $aborts; failures: $failed"
echo "command: PARALLEL=$PARALLEL OMP_NUM_THREADS=$OMP_NUM_THREADS bench/torchrun_stress.sh $N" \
     "(jobs: ${TORCHRUN[*]:1} {train-teacher | distill | eval --dump-features} on digits; logs in $DIR)"
((failed == 0))
