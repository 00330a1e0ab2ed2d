#!/usr/bin/env bash
# The regularizers study's runs (lwat reproduce regularizers --scale cpu), trained from a worktree of a fixed commit
# so that work on main never changes code under a running experiment; each finished run's small files (config, host,
# log, metrics, eval) are copied into main's results/regularizers/runs/ and committed there as it lands.
#
#   bash results/regularizers/run_study.sh COMMIT [WORKERS]   # from main's root; resumes whatever is unfinished
#
# WORKERS (default 2) processes at one torch thread each share the trainings (each skips runs another is training):
# `lwat reproduce regularizers`, then train_more.py for what main's module plans beyond the worktree's preset (more
# seeds of DUE rows, the COMBINED rows), still with the worktree's code. Logs: /work/study-logs/. Needs main's .venv.
set -euo pipefail
commit=${1:?commit to train from}
workers=${2:-2}
main=$(pwd)
tree=/work/study-$commit
data=$(realpath ../shared/data/cifar10-jpeg.tar.gz)
logs=/work/study-logs
mkdir -p "$logs"
[ -d "$tree" ] || git worktree add --detach "$tree" "$commit"
cd "$tree"
export PYTHONPATH="$tree" OMP_NUM_THREADS=1
py="$main/.venv/bin/python"
"$py" -c "import lwat, sys; assert lwat.__file__.startswith('$tree'), lwat.__file__"
for w in $(seq 1 "$workers"); do
  nohup nice -n 10 bash -c '"$0" -m lwat reproduce regularizers --scale cpu --out results/regularizers --data-dir "$1" \
    --device cpu --progress lines && "$0" "$2/results/regularizers/train_more.py" "$2/lwat/paper/regularizers.py" \
    results/regularizers "$1"' "$py" "$data" "$main" >> "$logs/worker$w.log" 2>&1 &
  sleep 20  # the next worker finds the first run locked
done
# Harvest: evaluate finished runs, copy their small files to main, commit each (harvest.sh).
nohup bash "$main/results/regularizers/harvest.sh" "$main" "$tree" "$commit" >> "$logs/harvest.log" 2>&1 &
echo "workers: $workers; worktree: $tree; logs: $logs"
