#!/usr/bin/env bash
# The demo search of results/demo-search/README.md, in the order it ran (each line appends to results.jsonl).
set -e
cd "$(dirname "$0")"
PY="nice -n 5 python search.py"
# Search batch 1: validation split, seeds 0-4.
$PY A_default 0-4 val '{}'
$PY B_sub200_e60 0-4 val '{"train_subset": 200, "epochs": 60, "lr_drop_every": 20}'
$PY C_sub200_e60_eps30 0-4 val '{"train_subset": 200, "epochs": 60, "lr_drop_every": 20, "eps": 30.0}'
$PY D_sub200_e60_fix0.3 0-4 val '{"train_subset": 200, "epochs": 60, "lr_drop_every": 20, "scale": "fixed", "eps": 0.3}'
$PY E_full_eps30 0-4 val '{"eps": 30.0}'
$PY F_full_fix0.3 0-4 val '{"scale": "fixed", "eps": 0.3}'
# Search batch 2: validation split, seeds 0-4.
$PY G_full_eps60 0-4 val '{"eps": 60.0}'
$PY H_full_fix1.0 0-4 val '{"scale": "fixed", "eps": 1.0}'
$PY I_sub200_e60_fix1.0 0-4 val '{"train_subset": 200, "epochs": 60, "lr_drop_every": 20, "scale": "fixed", "eps": 1.0}'
$PY J_sub200_e60_eps100 0-4 val '{"train_subset": 200, "epochs": 60, "lr_drop_every": 20, "eps": 100.0}'
$PY K_sub500_e40_fix0.3 0-4 val '{"train_subset": 500, "epochs": 40, "lr_drop_every": 14, "scale": "fixed", "eps": 0.3}'
$PY L_sub500_e40_eps30 0-4 val '{"train_subset": 500, "epochs": 40, "lr_drop_every": 14, "eps": 30.0}'
# Search batch 3: validation split, seeds 0-4.
$PY M_full_fix0.2 0-4 val '{"scale": "fixed", "eps": 0.2}'
$PY N_full_fix0.5 0-4 val '{"scale": "fixed", "eps": 0.5}'
$PY O_full_eps20 0-4 val '{"eps": 20.0}'
$PY P_full_e20_fix0.3 0-4 val '{"epochs": 20, "lr_drop_every": 7, "scale": "fixed", "eps": 0.3}'
$PY Q_resnet20w0.5_e15_eps10 0-4 val '{"model": "resnet20", "width": 0.5, "epochs": 15, "lr_drop_every": 5, "eps": 10.0}'
# Search batch 4: validation split, seeds 0-4.
$PY R_full_fix0.1 0-4 val '{"scale": "fixed", "eps": 0.1}'
$PY S_full_fix0.15 0-4 val '{"scale": "fixed", "eps": 0.15}'
# Confirmation on fresh seeds 10-19, real test set (no validation split): the chosen config and the range-scaled alternative.
$PY CONFIRM_M_full_fix0.2 10-19 test '{"scale": "fixed", "eps": 0.2}'
$PY CONFIRM_E_full_eps30 10-19 test '{"eps": 30.0}'
$PY CONFIRM_A_default 10-19 test '{}'
