# Sourced by the bench/*.sh scripts: sets PY to the first interpreter that has torch and torchvision
# ($PYTHON, the project's .venv, python3, python), or exits 3 with one line naming the script ($1).
PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch, torchvision' 2>/dev/null; then
    PY=$candidate
    break
  fi
done
if [[ -z "$PY" ]]; then
  echo "$1: no Python with torch and torchvision found; set PYTHON=/path/to/python" >&2
  exit 3
fi
