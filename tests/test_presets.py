"""Tests of lwat.presets and lwat.reproduce: every preset end to end at smoke scale, reuse, resume, the report."""

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import pytest

import lwat.reproduce as rep
from lwat.cli import main
from lwat.config import TrainConfig
from lwat.models import VGG16_POOL_BN_DEPTHS
from lwat.evaluate import FGSM_EPS
from lwat.paper.table4 import STANDARDIZED_EPS
from lwat.presets import (
    PRESETS, SCALES, DataSource, data_identity, data_label, estimate_cpu_seconds, list_presets, resolve_data, toy_config,
)
from lwat.render import MIN_RUNS, claim, difference, stats, verdict
from lwat.reproduce import find_run, index_runs, reproduce, run_key
from lwat.train import train

SMOKE = dict(scale="smoke", device="cpu", progress="none")


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    """One smoke-scale output folder shared by the tests of this file: trainings are made once, then reused."""
    return tmp_path_factory.mktemp("smoke")


def sections(report: str) -> dict[str, str]:
    return {part.split(":", 1)[0]: part for part in report.split("\n## ")[1:]}


# What each section must show: the paper's numbers, copied beside ours.
PAPER_SNIPPETS = {
    "table1": ["| FGS [5] | paper | 92.4 | 53.28 | 41.58 | 36.44 | 33.85 |",
               "| Ours - all layers | paper | 92.4 | 48.56 | 21.72 | 14.76 | 14.19 |"],
    "table2": ["| 0.1 | 0.03 | 12.47 | 6.05 |", "| 39.5 |", "| 43.3 |"],
    "table3": ["| CIFAR-100 | resnet56 | Perturbed | n/a |"],
    "table4": ["| Baseline | paper | 89.4 | 67.5 | 49.6 | 41.2 | 37.3 | 34.7 |",
               "| Ours-joint | paper | 91.5 | 86.07 | 81.38 | 75.72 | 70.25 | 64.76 |", "| Ours-joint | 2x |"],
    "table5": ["| CIFAR-100 | with Dropout | 70.5 |", "| 73.1 |"],
    "table6": ["| paper | 89.5 | 89.62 | 90.24 | 91.1 | 91.3 | 89.4 |"],
    "table7": ["| 3.62 ± 0.05 |", "| 17.1 ± 0.1 |"],
    "eps": ["| lat, eps 30 |", "| fgsm (Table 2) |"],
    "regularizers": ["| SAM, rho 0.05, half the epochs | 1 |", "**Is lat worth it? At this scale (vgg16_bn at width"],
    "figure1": ["![t-SNE"], "figure2": ["![mean singular values"], "figure3": ["![train and test error"],
}


@pytest.mark.parametrize("target", list(PRESETS))
def test_every_preset_runs_at_smoke_scale_and_reports_beside_the_paper(target, smoke_out, tmp_path):
    result = reproduce(target, out=tmp_path if PRESETS[target].study else smoke_out, **SMOKE)  # a study: apart
    assert result["status"] == "finished"
    assert result["trainings"] and set(result["trainings"].values()) <= {"trained", "reused"}
    section = sections(Path(result["report"]).read_text())[target]
    assert PRESETS[target].caption in section
    for snippet in PAPER_SNIPPETS[target]:
        assert snippet in section, snippet
    for missing in ("not run yet", "needs checkpoint", "unfinished", "not measured yet"):
        assert missing not in section, missing
    ours = [line for line in section.splitlines() if "ours" in line and line.startswith("|")]
    assert ours or target.startswith("figure") or PRESETS[target].study, "no row of our numbers"
    for png in (smoke_out / "analysis").glob("*.png"):
        assert png.stat().st_size > 1000
    if PRESETS[target].study:  # its figure, drawn with the report
        assert (tmp_path / f"{target}.png").stat().st_size > 1000


def test_report_numbers_and_claims_are_those_of_the_run_files(smoke_out):
    """Table 6's row and claims against the runs' own metrics.json, read and compared by hand."""
    section = sections(Path(reproduce("table6", out=smoke_out, **SMOKE)["report"]).read_text())["table6"]
    acc = {}
    for path in (smoke_out / "runs").glob("*/metrics.json"):
        cfg = json.loads((path.parent / "config.json").read_text())
        if cfg["model"] == "vgg16_bn" and not (cfg["flip"] or cfg["dropout"]) and cfg["dataset"] == "synthetic":
            if cfg["method"] == "baseline" or (cfg["method"] == "lat" and cfg["depth"]):
                acc[cfg["depth"] or "baseline"] = 100 * json.loads(path.read_text())["test_acc"]
    assert set(acc) == {*VGG16_POOL_BN_DEPTHS, "baseline"}
    row = [acc[d] for d in VGG16_POOL_BN_DEPTHS] + [acc["baseline"]]
    assert "| ours | " + " | ".join(f"{a:.1f}" for a in row) + " |" in section
    for k, depth in enumerate(VGG16_POOL_BN_DEPTHS, 1):
        # one seed a side at smoke scale: never decided
        assert f"- pool{k} beats the baseline: **not decided** (pool{k} {acc[depth]:.2f}% vs baseline " \
               f"{acc['baseline']:.2f}%; difference {acc[depth] - acc['baseline']:+.2f}, no interval" in section


def test_the_verdict_rule_decides_only_with_three_runs_a_side_and_an_interval_clear_of_zero():
    from scipy import stats as sp

    a, b = [60.1, 60.6, 59.9, 60.3], [59.0, 59.4, 58.7]
    welch = sp.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)  # the independent reference
    diff, lo, hi, how = difference(stats(a), stats(b))
    assert (lo, hi) == pytest.approx((welch.low, welch.high)) and diff == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert claim("a beats b", stats(a), stats(b)).startswith("- a beats b: **yes** (60.22% vs 59.03%; difference +1.19")
    assert claim("b beats a", stats(b), stats(a)).startswith("- b beats a: **no**")
    assert claim("b below a", stats(b), stats(a), higher=False).startswith("- b below a: **yes**")
    # one run a side: never decided, whatever the gap
    assert claim("a beats b", (70.0, 0.0, 1), (50.0, 0.0, 1)) == (
        "- a beats b: **not decided** (70.00% vs 50.00%; difference +20.00, no interval from one run; n = 1/1)")
    # two runs a side, well apart: still not decided (fewer than MIN_RUNS)
    assert verdict(stats([70.0, 70.1]), stats([50.0, 50.1])) == "not decided" and MIN_RUNS == 3
    # overlapping seeds (Table 3's VGG rows: 70.35, 70.20, 69.00 against 69.92, 67.95, 67.15 in an earlier audit)
    lat, base = {0: 70.35, 1: 70.20, 2: 69.00}, {0: 69.92, 1: 67.95, 2: 67.15}
    assert claim("lat beats baseline", stats(list(lat.values())), stats(list(base.values()))).startswith(
        "- lat beats baseline: **not decided**")
    paired = sp.ttest_rel(list(lat.values()), list(base.values())).confidence_interval(0.95)
    _, lo, hi, how = difference(lat, base)
    assert (lo, hi) == pytest.approx((paired.low, paired.high)) and how == "paired by seed, n = 3"
    # pairing by seed decides what Welch cannot when the seeds move together
    a, b = {0: 61.0, 1: 65.0, 2: 69.0}, {0: 60.5, 1: 64.4, 2: 68.6}
    assert verdict(stats(list(a.values())), stats(list(b.values()))) == "not decided" and verdict(a, b) == "yes"


def test_an_analysis_of_an_older_version_is_kept_until_it_can_be_computed_again(smoke_out, tmp_path):
    """Table 1's strength rows from before the input_random control: shown as they are (the new row asks for the
    checkpoints) where the runs have no checkpoint, computed again where they have."""
    reproduce("table1", out=smoke_out, **SMOKE)
    path = smoke_out / "analysis" / "table1-strength.json"
    stored = json.loads(path.read_text())
    entry = stored["seeds"]["0"]
    assert entry["version"] == 2 and {r["kind"] for r in entry["rows"]} >= {"input_random", "input_prev"}
    old = {**entry, "rows": [r for r in entry["rows"] if r["kind"] != "input_random"]}
    del old["version"]
    path.write_text(json.dumps({**stored, "seeds": {"0": old}}))
    copy = tmp_path / "copy"
    shutil.copytree(smoke_out, copy, ignore=shutil.ignore_patterns("checkpoint.pt"))
    part = sections(Path(reproduce("table1", out=copy, **SMOKE)["report"]).read_text())["table1"]
    row = next(line for line in part.splitlines() if line.startswith("| random signs at the input only"))
    assert row.count("needs checkpoint, re-run") == 5
    assert "| previous-batch signs at the input only (control) | ours (n=1) | " in part and "needs checkpoint" \
        not in next(line for line in part.splitlines() if line.startswith("| previous-batch signs at the input"))
    reproduce("table1", out=smoke_out, **SMOKE)  # with the checkpoints: computed again, every row
    assert json.loads(path.read_text())["seeds"]["0"] == entry


def test_second_reproduce_reuses_everything(smoke_out, monkeypatch):
    first = reproduce("all", out=smoke_out, **SMOKE)  # trains whatever the parametrized tests did not
    report = Path(first["report"]).read_text()
    assert set(sections(report)) == {n for n, p in PRESETS.items() if not p.study}  # "all": the paper's

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be recomputed")

    monkeypatch.setattr(rep, "train", refuse)
    monkeypatch.setattr(rep, "evaluate_run", refuse)
    monkeypatch.setattr(rep, "_compute", refuse)
    again = reproduce("all", out=smoke_out, **SMOKE)
    assert set(again["trainings"].values()) == {"reused"}
    assert len(again["trainings"]) == len(first["trainings"])
    assert Path(again["report"]).read_text() == report
    runs = list((smoke_out / "runs").iterdir())
    assert len(runs) == len(first["trainings"])  # shared trainings (Table 4's baseline in Tables 1, 5, 6) once
    for run in runs:
        assert {"config.json", "log.jsonl", "metrics.json", "host.json"} <= {p.name for p in run.iterdir()}
        assert not (run / "reproduce.lock").exists()


def test_evaluation_adds_only_the_missing_eps(smoke_out, monkeypatch):
    """An eps added to a preset is evaluated alone; the accuracies eval.json already holds are kept as they are."""
    reproduce("table4", out=smoke_out, **SMOKE)
    run = next(p for p in (smoke_out / "runs").iterdir() if p.name.startswith("vgg-noaug-cifar10-lat-seed0"))
    old = json.loads((run / "eval.json").read_text())
    assert set(old["accuracy"]) == {f"{e:g}" for e in FGSM_EPS + STANDARDIZED_EPS}
    dropped = f"{STANDARDIZED_EPS[-1]:g}"
    kept = {k: (0.123 if k == "0.02" else v) for k, v in old["accuracy"].items() if k != dropped}
    (run / "eval.json").unlink()  # finished, not yet evaluated: the stored plot is out of date, nothing fails
    assert rep.collect(PRESETS["table4"].plan("smoke", device="cpu"), smoke_out).analyses["table4-robustness"]
    (run / "eval.json").write_text(json.dumps({**old, "accuracy": kept}))
    asked = []
    real = rep.evaluate_run
    monkeypatch.setattr(rep, "evaluate_run", lambda path, **kw: asked.append((Path(path).name, kw["eps_list"]))
                        or real(path, **kw))
    reproduce("table4", out=smoke_out, **SMOKE)
    assert asked == [(run.name, [STANDARDIZED_EPS[-1]])]
    now = json.loads((run / "eval.json").read_text())
    assert now["accuracy"] == {**kept, dropped: old["accuracy"][dropped]}  # 0.123 was not recomputed


def test_report_from_small_files_alone(smoke_out, tmp_path):
    """Results copied without checkpoints (as committed): tables still render; model analyses ask for a re-run."""
    reproduce("all", out=smoke_out, **SMOKE)
    out = tmp_path / "copy"
    shutil.copytree(smoke_out, out, ignore=shutil.ignore_patterns("checkpoint.pt", "analysis", "eval.json"))
    result = reproduce("all", out=out, **SMOKE)
    assert set(result["trainings"].values()) == {"reused"}
    parts = sections(Path(result["report"]).read_text())
    assert "needs checkpoint, re-run" in parts["table1"] and "needs checkpoint, re-run" in parts["table4"]
    assert "needs checkpoint, re-run" not in parts["table5"]  # a table from metrics.json
    assert "![train and test error" in parts["figure3"]  # curves need only the logs


def test_time_ratio_compares_runs_made_on_the_same_machine(smoke_out, tmp_path):
    reproduce("table4", out=smoke_out, **SMOKE)
    out = tmp_path / "copy"
    shutil.copytree(smoke_out, out, ignore=shutil.ignore_patterns("checkpoint.pt", "analysis"))
    runs = {g: next((out / "runs").glob(f"vgg-noaug-cifar10-{g}-seed0*")) for g in ("baseline", "lat", "fgsm")}

    def measured(group, images_per_s, gpu):
        metrics = json.loads((runs[group] / "metrics.json").read_text())
        (runs[group] / "metrics.json").write_text(json.dumps({**metrics, "images_per_s": images_per_s}))
        (runs[group] / "host.json").write_text(json.dumps({"cpu": "x", "threads": 1, "gpu": gpu, "torch": "x"}))

    def table4():
        return sections(Path(reproduce("table4", out=out, **SMOKE)["report"]).read_text())["table4"]

    measured("baseline", 300.0, gpu="GPU A")
    measured("lat", 100.0, gpu=None)  # same thread count, but one ran on a GPU: not comparable
    measured("fgsm", 150.0, gpu=None)
    part = table4()
    assert "| Ours-orig | X |" in part and "- training time relative to the baseline: not measured yet" in part
    measured("lat", 200.0, gpu="GPU A")
    measured("fgsm", 150.0, gpu="GPU A")
    part = table4()  # 300 / 200 and 300 / 150 images/s
    assert "| Type | paper | GPU A (torch x) |" in part
    assert "| Ours-orig | X | 1.50x (n=1) |" in part and "| FGS-orig | 2x | 2.00x (n=1) |" in part
    # one ratio a side from the logs: the rule never decides it (benchmarks measure time side by side)
    assert "- lat costs less time than every two-pass method on GPU A (torch x): **not decided** (lat 1.50x vs " \
           "fastest two-pass 2.00x; difference -0.50, no interval from one run; n = 1/1)" in part


def test_interrupted_reproduction_resumes(tmp_path, monkeypatch):
    real_train = rep.train

    def interrupted(cfg, out, **kwargs):
        return real_train(cfg, out, stop_after_steps=2, **kwargs)

    monkeypatch.setattr(rep, "train", interrupted)
    first = reproduce("figure2", out=tmp_path, **SMOKE)
    assert first["status"] == "interrupted" and list(first["trainings"].values()) == ["interrupted"]
    run = next((tmp_path / "runs").iterdir())
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    assert "unfinished (epoch 0 of 1)" in Path(first["report"]).read_text()
    monkeypatch.setattr(rep, "train", real_train)
    second = reproduce("figure2", out=tmp_path, **SMOKE)
    assert second["status"] == "finished"
    assert list(second["trainings"].values()) == ["resumed", "trained", "trained"]
    assert (run / "metrics.json").exists() and len(list((tmp_path / "runs").iterdir())) == 3
    assert "![mean singular values" in Path(second["report"]).read_text()


def test_runs_made_elsewhere_are_found_by_config_and_left_alone_while_busy(tmp_path):
    plan = PRESETS["figure2"].plan("smoke", device="cpu")
    wanted = plan.trainings[0]
    elsewhere = tmp_path / "runs" / "my-own-name"
    train(wanted.config.replace(device="auto"), elsewhere, progress="none", stop_after_steps=2)  # not via reproduce
    index = index_runs(tmp_path / "runs")
    assert find_run(index, wanted) == (elsewhere, "unfinished")
    outcome, run = rep.ensure_trained(wanted, tmp_path / "runs", index, progress="none")
    assert outcome.startswith("busy") and run == elsewhere  # just written by another process: maybe training
    old = time.time() - 2 * rep.BUSY_SECONDS
    for p in elsewhere.iterdir():
        os.utime(p, (old, old))
    assert rep.ensure_trained(wanted, tmp_path / "runs", index, progress="none") == ("resumed", elsewhere)
    assert rep.ensure_trained(wanted, tmp_path / "runs", index, progress="none") == ("reused", elsewhere)


def test_two_reproductions_side_by_side_train_each_run_once(tmp_path):
    """A reproduce process whose index predates another's run (started or finished since) must not train it again."""
    wanted = PRESETS["figure2"].plan("smoke", device="cpu").trainings[0]
    root = tmp_path / "runs"
    old_index = index_runs(root)  # taken before the other process began
    assert rep.ensure_trained(wanted, root, {}, progress="none")[0] == "trained"  # the other process
    assert rep.ensure_trained(wanted, root, old_index, progress="none")[0] == "reused"
    assert len(list(root.iterdir())) == 1


def test_run_key_ignores_where_and_how_but_not_what():
    cfg = TrainConfig(model="mlp_tanh", dataset="folder", data_dir="/a/cifar10-jpeg.tar.gz", device="cpu")
    assert run_key(cfg) == run_key(cfg.replace(data_dir="/elsewhere/cifar10-jpeg.tar.gz", device="cuda",
                                               download=True))
    assert run_key(cfg) != run_key(cfg.replace(data_dir="/a/cifar100-jpeg.tar.gz"))  # another data set
    assert run_key(cfg) != run_key(cfg.replace(seed=1))
    assert data_identity("folder", "/x/cifar10-jpeg/") == data_identity("folder", "/y/cifar10-jpeg.tar.gz")
    assert data_identity("cifar10", "/anywhere") == "cifar10"


def test_data_sources_and_labels(tmp_path):
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"")
    official = tmp_path / "c100"
    (official / "cifar-100-python").mkdir(parents=True)
    data = resolve_data("cpu", cifar10=archive, cifar100=official)
    assert (data["cifar10"].dataset, data["cifar10"].label) == ("folder", "CIFAR-10 (JPEG q75 copy)")
    assert (data["cifar100"].dataset, data["cifar100"].label) == ("cifar100", "CIFAR-100")
    assert all(d.available for d in data.values())
    none = resolve_data("paper")
    assert not none["cifar100"].available and not none["cifar10"].available
    assert ("folder", "cifar10-jpeg.tar.gz") in none["cifar10"].alternatives  # a JPEG-copy run is still found
    assert resolve_data("smoke", cifar10="/ignored")["cifar100"].dataset == "synthetic100"
    assert data_label("folder", "/d/my_pets.tar") == "image folder my_pets"
    with pytest.raises(ValueError, match="not found"):
        resolve_data("cpu", cifar10=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown scale"):
        resolve_data("huge")


def test_cifar100_rows_say_no_data_without_it(tmp_path):
    plan = PRESETS["table5"].plan("cpu", data=resolve_data("cpu", cifar10=None))
    assert all(not t.available for t in plan.trainings)
    outcome, _ = rep.ensure_trained(plan.trainings[-1], tmp_path, {}, progress="none")
    assert outcome == "no data"
    res = rep.collect(plan, tmp_path)
    assert res.status("cifar100-lat") == "not run (no data given)"


def test_presets_follow_the_paper_and_the_scales():
    from lwat.paper.regularizers import DUE as study_due
    for name, preset in PRESETS.items():
        for scale in SCALES:
            plan = preset.plan(scale)
            groups = plan.groups()
            for group in groups:  # the study's rows due more seeds (its DUE) plan seeds 0..4, the others 0..seeds-1
                seeds = plan.seeds
                if PRESETS[name].study and group in study_due and plan.seeds >= 3:
                    seeds = 5
                assert [t.seed for t in plan.group(group)] == list(range(seeds)), (name, scale, group)
            for job in plan.analyses:
                assert set(job.all_groups()) <= set(groups), (name, job.name)
            for ev in plan.evaluations:
                assert ev.group in groups
            if scale == "cpu" and not plan.skipped:
                for t in plan.trainings:
                    minutes = estimate_cpu_seconds(t.config) / 60
                    # the toy keeps the paper's config; Table 5 trains on all 50,000 images at cpu scale
                    limit = 35 if t.config.model == "mlp_tanh" or t.config.train_subset is None else 15
                    assert minutes <= limit, (t.name, minutes)
            if scale == "paper" and not preset.study:  # a study beyond the paper sets its own schedule
                for t in plan.trainings:
                    assert t.config.width == 1.0 and t.config.train_subset is None
                    if t.config.model in ("vgg16_bn", "resnet20", "resnet56"):
                        assert t.config.epochs == 300 and t.config.momentum == 0.9 and t.config.lr == 0.1
                        assert t.config.lr_drop_every == (60 if t.group.startswith("cifar100") else 50)
    assert PRESETS["table3"].plan("paper").seeds == 5 and PRESETS["table7"].plan("paper").seeds == 5
    depths = [t.config.depth for t in PRESETS["table6"].plan("cpu").trainings if t.config.method == "lat"]
    assert sorted(set(depths)) == list(VGG16_POOL_BN_DEPTHS)


def test_shared_trainings_have_equal_configs():
    def config(preset, group, scale="cpu"):
        return PRESETS[preset].plan(scale).group(group)[0].config

    for scale in SCALES:
        base = config("table4", "baseline", scale)
        assert base == config("table1", "baseline", scale) == config("table6", "baseline", scale)
        assert base == config("figure1", "baseline", scale)
        # Table 5 shares Table 4's rows except at cpu scale, where it trains on every image (dropout trains there)
        all_images = {"train_subset": None} if scale == "cpu" else {}
        assert base.replace(**all_images) == config("table5", "cifar10-baseline", scale)
        assert config("table4", "lat", scale).replace(**all_images) == config("table5", "cifar10-lat", scale)
        assert base.replace(dropout=True, **all_images) == config("table5", "cifar10-baseline-dropout", scale)
        assert config("figure3", "cifar10-vgg16_bn-lat", scale) == config("table3", "cifar10-vgg16_bn-lat", scale)
        assert config("table2", "toy-fgsm", scale) == config("figure2", "toy-fgsm", scale)


def test_toy_config_is_the_one_being_trained():
    """cpu and paper scale share the toy config exactly, so toy runs trained by hand are reused."""
    folder = DataSource("cifar10", "folder", "/x/cifar10-jpeg.tar.gz", "CIFAR-10 (JPEG q75 copy)", True)
    for scale in ("cpu", "paper"):
        for method in ("baseline", "lat", "fgsm"):
            expected = TrainConfig(model="mlp_tanh", method=method, dataset="folder", data_dir="/d/cifar10-jpeg.tar.gz",
                                   grayscale=True, crop=False, flip=False, epochs=60, lr=0.01, lr_drop_every=20,
                                   batch_size=128, eps=10.0, seed=3)
            assert run_key(toy_config(method, 3, folder, scale=scale, device="cpu")) == run_key(expected)


def test_list_presets_and_cli(capsys, smoke_out):
    rows = {r["name"]: r for r in list_presets()}
    assert set(rows) == {*PRESETS, "all"}
    assert rows["table7"]["skipped"].keys() == {"cpu"}
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n{name} " in out
    code = main(["reproduce", "figure2", "--scale", "smoke", "--out", str(smoke_out), "--device", "cpu",
                 "--progress", "none"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() == str(smoke_out / "REPORT.md")
    for argv, message in ((["reproduce", "table9", "--scale", "smoke"], "unknown preset 'table9'"),
                          (["reproduce", "table1", "--scale", "huge"], "unknown scale 'huge'"),
                          (["reproduce", "table1", "--seeds", "0"], "seeds must be >= 1")):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_results_gitignore_keeps_checkpoints_out():
    ignore = (Path(__file__).parent.parent / "results" / ".gitignore").read_text().split()
    assert {"checkpoint.pt", "*.tmp", "!runs/"} <= set(ignore)


def test_data_line_names_the_data_the_runs_used_once_per_data_set():
    # The committed cpu-scale runs: Table 5 has a finished CIFAR-10 run (the JPEG copy) and no CIFAR-100 run.
    from lwat.paper.report import _setup
    out = Path(__file__).parent.parent / "results" / "cpu"
    res = rep.collect(PRESETS["table5"].plan("cpu", data=resolve_data("cpu")), out)
    assert any(r.finished for group in res.runs.values() for r in group)
    line = next(x for x in _setup(res) if x.startswith("- Data: "))
    assert line.startswith("- Data: CIFAR-10 (JPEG q75 copy), CIFAR-100: not given; "), line


def test_an_analysis_of_a_run_trained_again_is_not_shown_as_its(smoke_out, tmp_path):
    """A run deleted and trained again keeps its name: the analysis rows of the earlier training must not be reported
    for it (they say "needs checkpoint, re-run" without its checkpoint, and are computed again with it)."""
    reproduce("table1", out=smoke_out, **SMOKE)
    copy = tmp_path / "copy"
    shutil.copytree(smoke_out, copy)
    stored = json.loads((copy / "analysis" / "table1-strength.json").read_text())["seeds"]["0"]
    run = copy / "runs" / stored["runs"][0].split("=", 1)[1]
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["train_seconds"] += 1.0  # what a second training of the same config would leave
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "checkpoint.pt").rename(run / "elsewhere.pt")
    part = sections(Path(reproduce("table1", out=copy, **SMOKE)["report"]).read_text())["table1"]
    row = next(line for line in part.splitlines() if line.startswith("| random signs at every point"))
    assert row.count("needs checkpoint, re-run") == 5, row
    (run / "elsewhere.pt").rename(run / "checkpoint.pt")
    reproduce("table1", out=copy, **SMOKE)
    entry = json.loads((copy / "analysis" / "table1-strength.json").read_text())["seeds"]["0"]
    assert entry["trained"] == {"baseline": metrics["train_seconds"]} != stored["trained"]
    assert entry["rows"] == stored["rows"]  # the same checkpoint here: the same rows, computed again


def test_the_seeds_line_counts_planned_and_further_seeds_apart(smoke_out, tmp_path):
    """A finished run of a seed the plan does not ask for is used (collect), but is not one of the planned trainings:
    "1 of 1 planned" and "1 further seed", never "2 of 1 planned"."""
    reproduce("table5", out=smoke_out, **SMOKE)
    out = tmp_path / "copy"
    shutil.copytree(smoke_out, out, ignore=shutil.ignore_patterns("analysis"))
    before = sections(Path(reproduce("table5", out=out, **SMOKE)["report"]).read_text())["table5"]
    planned = int(before.split(" planned trainings finished")[0].rsplit(" of ", 1)[1])
    assert f"{planned} of {planned} planned trainings finished (a table row" in before
    source = next((out / "runs").glob("vgg-noaug-cifar10-baseline-seed0-*"))
    extra = out / "runs" / source.name.replace("-seed0-", "-seed1-")
    shutil.copytree(source, extra)
    config = json.loads((extra / "config.json").read_text())
    (extra / "config.json").write_text(json.dumps({**config, "seed": 1}))
    part = sections(Path(reproduce("table5", out=out, **SMOKE)["report"]).read_text())["table5"]
    assert f"{planned} of {planned} planned trainings finished, and 1 further seed(s) found" in part, part


def test_a_row_averages_one_data_set(tmp_path):
    """Seeds of one row finished on the official files and on the accepted JPEG copy are not averaged together: the
    row reads the data set of its first finished seed, and a seed finished only on the other is not finished there."""
    from lwat.rundir import write_json
    plan = PRESETS["table6"].plan("cpu", 3, None, "cpu")
    base = [t for t in plan.trainings if t.group == "baseline"]
    assert base[0].alternatives, "table6 at cpu scale accepts the JPEG copy"

    def fake(cfg, name, acc):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        write_json(run / "config.json", cfg.to_dict())
        write_json(run / "metrics.json", {"status": "finished", "test_acc": acc, "best_test_acc": acc, "train_acc": 1})
        (run / "log.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": acc, "train_acc": 1.0, "seconds": 1.0}))
    fake(base[0].config, "b0", 0.60)  # the official files
    fake(base[1].alternatives[0], "b1", 0.70)  # the JPEG copy
    fake(base[2].config, "b2", 0.80)
    runs = rep.collect(plan, tmp_path).runs["baseline"]
    assert [r.finished for r in runs] == [True, False, True]
    assert [r.metrics["test_acc"] for r in runs if r.finished] == [0.60, 0.80]


def test_table1_counts_n_per_row():
    # The committed cpu-scale Table 1: two seeds analysed before the random-input control existed (no checkpoint to
    # add it): its row is n=0, the others n=2 (every row said n=2).
    from lwat.paper import table1
    out = Path(__file__).parent.parent / "results" / "cpu"
    res = rep.collect(PRESETS["table1"].plan("cpu", data=resolve_data("cpu")), out)
    lines = "\n".join(table1.render(res))
    stored = json.loads((out / "analysis" / "table1-strength.json").read_text())["seeds"].values()
    clean = [100 * r["accuracy"] for seed in stored for r in seed["rows"] if r["kind"] == "layerwise" and r["eps"] == 0]
    assert len(clean) == 2
    assert f"| ours (layerwise, n=2) | {statistics.mean(clean):.1f} ± {statistics.stdev(clean):.1f} |" in lines
    assert "| random signs at the input only (control) | ours (n=0) | needs checkpoint, re-run |" in lines


def test_eps_spread_compares_seed_0_of_every_eps():
    # The committed cpu-scale toy runs: eps 10 has three seeds, eps 5, 20 and 30 one each. The spread and the best
    # eps compare seed 0 of each (the mean of three seeds against single seeds mixed n=3 with n=1).
    from lwat.paper import eps as eps_preset
    out = Path(__file__).parent.parent / "results" / "cpu"
    res = rep.collect(PRESETS["eps"].plan("cpu", data=resolve_data("cpu")), out)
    seed0 = {}
    for config in (out / "runs").glob("toy-*/config.json"):
        cfg = json.loads(config.read_text())
        if cfg["method"] == "lat" and cfg["seed"] == 0 and (config.parent / "metrics.json").exists():
            seed0[cfg["eps"]] = 100 * json.loads((config.parent / "metrics.json").read_text())["test_acc"]
    assert sorted(seed0) == [5.0, 10.0, 20.0, 30.0]
    lines = "\n".join(eps_preset.render(res))
    best = max(seed0, key=seed0.get)
    assert f"- spread of lat's accuracy over eps 5, 10, 20, 30, seed 0 of each: " \
           f"{max(seed0.values()) - min(seed0.values()):.2f} points" in lines
    assert f"lat at its best eps ({best:g}, by seed 0) beats fgsm" in lines


def test_report_header_names_only_the_data_its_presets_use():
    """Reporting without data (the committed runs only): the data line names the data set the runs used once, says
    that nothing trains, and leaves out a data set no reported preset needs (the study uses CIFAR-10 alone)."""
    from lwat.paper import report
    from lwat.presets import resolve_data
    data = resolve_data("cpu")  # nothing given
    line = next(x for x in report.header("cpu", [], data, {"cifar10"}, None) if x.startswith("- Data:"))
    assert "CIFAR-100" not in line and line.count("CIFAR-10") == 1 and "trains nothing" in line, line
    line = next(x for x in report.header("cpu", [], data, {"cifar10", "cifar100"}, None) if x.startswith("- Data:"))
    assert "CIFAR-10 and CIFAR-100 not given" in line, line


def test_study_headline_and_the_rows_due_more_seeds_from_the_verdicts_alone():
    """The regularizers study's one sentence, from per-seed numbers written by hand: a gain whose paired interval
    spans 0 is 'not decided'; one clear of 0 is a yes; with no other row trained it says so."""
    from types import SimpleNamespace as NS

    from lwat.paper import regularizers as study
    clean = {"baseline": {0: 69.0, 1: 70.0, 2: 68.0}, "lat": {0: 71.0, 1: 69.5, 2: 69.0}}  # +2, -0.5, +1
    fgsm = {"baseline": {0: 34.0, 1: 35.0, 2: 33.0}, "lat": {0: 41.0, 1: 42.0, 2: 41.0}}  # +7, +7, +8 points
    cfg = NS(model="vgg16_bn", width=0.25, train_subset=10000, epochs=30)

    def by_seed(group, key="test_acc", *, eps=None):
        return (clean if eps is None else fgsm).get(group, {})

    res = NS(by_seed=by_seed, finished=lambda group: [NS(config=cfg)] * len(clean.get(group, {})),
             plan=NS(trainings=[None] * 30))
    line = study.headline(res)
    assert "lat's gain over the baseline is not decided (n = 3)" in line, line
    assert "no other regularizer has a finished run yet" in line and "lat is more robust than the baseline" in line
    assert "(vgg16_bn at width 0.25, 10,000 training images, 30 epochs)" in line
    cfg.train_subset = None  # the whole training set (paper scale)
    assert "0.25, all training images" in study.headline(res)
    cpu_seeds = study.SEEDS["cpu"]
    assert study.due_more_seeds(res) == ["lat"]  # 3 seeds leave its interval across 0: 5 are due
    assert study.best_others(res) == []  # not before every row has 3 seeds
    clean.update({g: {0: 60.0 + i, 1: 60.0 + i, 2: 60.0 + i} for i, g in enumerate(study.ROWS) if g not in clean})
    # every row now: the highest means are the last rows of ROWS, but lat, the baseline and the control are none
    ranked = [g for g in reversed(study.ROWS) if g not in ("baseline", "lat", "random")]
    assert study.best_others(res) == ranked[:2] and "random" in study.ROWS
    clean["random"] = {0: 99.0, 1: 99.0, 2: 99.0}
    assert study.best_others(res) == ranked[:2]
    more = {t.group for t in PRESETS["regularizers"].plan("cpu").trainings if t.seed >= cpu_seeds}
    assert more == set(study.DUE) and study.MORE_SEEDS == 5
    assert all(t.seed == 0 for t in PRESETS["regularizers"].plan("smoke").trainings)  # smoke: one seed a row
