"""Table 1 with its input-only controls, mean ± std over the seeds measured in results/diagnostics/table1-input-control.

Reads seed*/strength.json there, or in the folder given (each written by `lwat analyze strength RUN --out .../seedN`),
and prints the table.

    python results/diagnostics/table1_control.py [FOLDER]
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

from lwat.render import fmt, stats, table

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("table1-input-control")
ROWS = {"fgsm": "FGSM at the input", "layerwise": "previous-batch signs, every layer (the paper's \"Ours\")",
        "input_prev": "previous-batch signs, input only", "input_random": "random signs, input only (the control)",
        "random": "random signs, every layer"}

seeds = [json.loads(p.read_text())["rows"] for p in sorted(HERE.glob("seed*/strength.json"))]
acc = defaultdict(list)  # (kind, eps) -> accuracy % per seed
for r in (r for rows in seeds for r in rows):
    acc[r["kind"], r["eps"]].append(100 * r["accuracy"])
eps = sorted({e for _, e in acc})
print(f"Accuracy % on all 10,000 test images, mean ± std over n={len(seeds)} retrained models:\n")
print("\n".join(table(["perturbation", *(f"eps {e:g}" for e in eps)],
                      [[name, *(fmt(stats(acc.get((kind, e), [])), digits=2) for e in eps)]
                       for kind, name in ROWS.items()])))
