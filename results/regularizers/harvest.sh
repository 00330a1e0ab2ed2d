#!/usr/bin/env bash
# Harvest the regularizers study (see run_study.sh): every 2 minutes while a worker lives, evaluate each finished run
# (clean + FGSM at the eps below: the study's table's and 0.04), copy its small files into main's
# results/regularizers/runs/ and commit them; a run evaluated before an eps was added is evaluated at it and
# committed again. After the last worker, one more pass takes the runs that finished with it.
#   bash results/regularizers/harvest.sh MAIN TREE COMMIT      (run_study.sh starts it)
set -uo pipefail
main=$1 tree=$2 commit=$3
eps="0 0.005 0.02 0.04"
py="$main/.venv/bin/python"
cd "$tree"
export PYTHONPATH="$tree" OMP_NUM_THREADS=1
alive() { pgrep -f "^$py (-m lwat reproduce regularizers|.*train_more.py)" > /dev/null; }
last=no
while [ $last = no ]; do
  alive || last=yes
  for run in results/regularizers/runs/*/; do
    name=$(basename "$run")
    [ -f "$run/metrics.json" ] || continue
    missing=$("$py" -c "import json, sys; a = json.load(open(sys.argv[1])).get('accuracy', {})
print(' '.join(e for e in sys.argv[2:] if e not in a))" "$run/eval.json" $eps 2>/dev/null || echo "$eps")
    if [ -n "$missing" ]; then
      nice -n 10 "$py" -m lwat eval "$run" --eps $missing --device cpu > /dev/null 2>&1 || continue
    fi
    dest="$main/results/regularizers/runs/$name"
    files=(config.json host.json metrics.json eval.json log.jsonl)  # the run's small files (no other script's)
    paths=("${files[@]/#/results/regularizers/runs/$name/}")
    [ -f "$dest/eval.json" ] && cmp -s "$run/eval.json" "$dest/eval.json" &&
      [ -z "$(git -C "$main" status --porcelain -- "${paths[@]}")" ] && continue  # copied and committed
    mkdir -p "$dest"
    for f in "${files[@]}"; do cp "$run/$f" "$dest/"; done
    (cd "$main" && git add -- "${paths[@]}" &&
     git commit -q -m "regularizers study: $name (trained from $commit)" -- "${paths[@]}") &&
      echo "$(date -u +%FT%TZ) committed $name"
  done
  [ $last = yes ] || sleep 120
done
echo "$(date -u +%FT%TZ) no worker left: harvest ends"
