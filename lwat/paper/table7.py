"""Table 7 (Section 4.4): WRN-28-10 with Ours-joint, with and without dropout, on CIFAR-10 and CIFAR-100."""

from __future__ import annotations

from lwat.paper.plan import DATA_NAMES, model, protocol
from lwat.render import claim, fmt, stats, table

NAME = "table7"
TITLE = "Table 7: WRN-28-10 with lat-joint, with and without dropout, CIFAR-10/100"
SEEDS = {"smoke": 1, "cpu": 2, "paper": 5}
PAPER = {
    "caption": "Table 7: Classification error rates (%) on CIFAR-10 and CIFAR-100 for WideResNet (WRN) architectures. "
               "Our results are reported as average of 5 runs. For comparison we provide the published WRN baseline "
               "results. (*) denotes the results obtained by a single run.",
    # row -> (our group or None, CIFAR-10 error, CIFAR-100 error)
    "rows": [("WRN-28-10", "wrn-baseline", "4.00", "19.25"),
             ("WRN-28-10 with dropout", "wrn-baseline-dropout", "3.89", "18.85"),
             ("WRN-40-10 with dropout*", None, "3.8", "18.3"),
             ("WRN-28-10 with Ours-joint", "wrn-lat-joint", "3.62 ± 0.05", "17.1 ± 0.1"),
             ("WRN-28-10 with Ours-joint", "wrn-lat-joint-dropout", "3.62 ± 0.05", "17.1 ± 0.1")],
}
GROUPS = {"wrn-baseline": ("baseline", False), "wrn-baseline-dropout": ("baseline", True),
          "wrn-lat-joint": ("lat-joint", False), "wrn-lat-joint-dropout": ("lat-joint", True)}  # (method, dropout)


def plan(plan, data, seeds, device):
    if plan.scale == "cpu":
        plan.skipped = ("WRN-28-10 takes 5.2 G multiply-adds per image, 260 times the cpu scale's VGG: one epoch of "
                        "10,000 images would take hours on 2 CPU cores. Run it at paper scale on a GPU.")
        return
    smoke = plan.scale == "smoke"
    for key in DATA_NAMES:
        for group, (method, dropout) in GROUPS.items():
            if smoke:  # a tiny stand-in model: only the code path is tested
                fields = {**model("smoke", "vgg16_bn"), **protocol("smoke", key, augment=True, device=device)}
            else:  # WRN paper, Section 4: 200 epochs, lr 0.1 x 0.2 at 60, 120, 160; flips and crops; dropout 0.3
                fields = dict(model="wrn28_10", epochs=200, lr_drop_every=60, flip=True, device=device)
            plan.add(f"{key}-{group}", data[key], seeds, method=method, dropout=dropout, **{**fields, "crop": True})
    if smoke:
        plan.notes.append("Smoke scale trains a tiny VGG as a stand-in for WRN-28-10.")
    else:
        plan.notes.append("The WRN schedule drops the lr at epochs 60, 120 and 160; lwat's step schedule drops it "
                          "every 60 epochs (60, 120, 180). The paper does not say whether Ours-joint used dropout: "
                          "both are trained.")


def render(res) -> list[str]:
    def err(group):
        return stats([100 * (1 - r.metrics["test_acc"]) for r in res.finished(group)])

    rows = []
    for name, group, c10, c100 in PAPER["rows"]:
        if group is None:
            ours = ["not trained (a published number)"] * 2
            label = name
        else:
            ours = [fmt(err(f"{k}-{group}"), res.status(f"{k}-{group}"), digits=2) for k in DATA_NAMES]
            label = f"{name} ({group}, {res.n('cifar10-' + group)} / {res.n('cifar100-' + group)})"
        rows.append([label, c10, ours[0], c100, ours[1]])
    lines = table(["Model", "CIFAR-10: paper", "CIFAR-10: ours", "CIFAR-100: paper", "CIFAR-100: ours"], rows)
    lines += ["", "Test error (%) at the end of training. The paper's baseline rows are published WRN numbers, ours "
              "are our own trainings.", "",
              "Claims (paper: Ours-joint lowers the error of WRN-28-10, with dropout or without):"]
    for k, data in DATA_NAMES.items():
        for drop in ("", "-dropout"):
            lines.append(claim(f"lat-joint{drop} has lower error than the baseline{drop} on {data}",
                               err(f"{k}-wrn-lat-joint{drop}"), err(f"{k}-wrn-baseline{drop}"), higher=False,
                               names=("lat-joint", "baseline")))
    return lines + [""]
