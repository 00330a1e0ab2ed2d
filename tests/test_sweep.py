"""Tests of `lwat sweep` / lwat.sweep: bad input, a smoke sweep and its reuse, the choice rule, resume."""

import json
import os
import time

import pytest

import lwat.sweep
from lwat.cli import main
from lwat.config import TrainConfig
from lwat.reproduce import run_key
from lwat.sweep import sweep
from lwat.train import train

# 1 epoch of the toy MLP on 32x32 gray synthetic images: 50 held out, 100 trained on (3 steps).
SMALL = ["--model", "mlp_tanh", "--dataset", "synthetic", "--grayscale", "--epochs", "1", "--batch-size", "32",
         "--train-subset", "100", "--val-size", "50", "--device", "cpu", "--progress", "none"]
BASE = TrainConfig(model="mlp_tanh", dataset="synthetic", grayscale=True, epochs=1, batch_size=32,
                   train_subset=100, val_size=50, device="cpu")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["--val-size", "0"], "give a validation split (--val-size N"),
    (["--eps", "0", "10"], "every eps must be a finite number > 0, got 0"),
    (["--eps", "-5"], "every eps must be a finite number > 0, got -5"),
    (["--eps", "inf"], "every eps must be a finite number > 0, got inf"),
    (["--eps", "10", "20", "10"], "eps 10 is given more than once"),
    (["--eps", "10", "10.0000001"], "eps 10 is given more than once (values are told apart to 6"),
    (["--method", "baseline"], "method 'baseline' does not use eps; sweep one that does: lat, lat-joint"),
    (["--method", "fgsm"], "method 'fgsm' does not use eps"),
    (["--method", "pgd"], "unknown method 'pgd'"),
    (["--model", "vgg19"], "unknown model 'vgg19'"),
    (["--seeds", "0"], "seeds must be >= 1, got 0"),
    (["--method", "lat-joint", "--sam", "0.05"], "sam: combines with the one-pass methods"),  # before the baseline
])
def test_bad_sweep_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    code, out, err = run(capsys, "sweep", *SMALL, "--eps", "5", *argv, "--out", str(tmp_path / "s"))
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing made


def test_a_training_that_fails_at_setup_leaves_no_run_folder(capsys, tmp_path):
    argv = [a if a != "50" else "5000" for a in SMALL]  # more validation images than the 100-image subset holds
    code, _, err = run(capsys, "sweep", *argv, "--eps", "5", "--out", str(tmp_path / "s"))
    assert code == 2 and "val_size=5000 is not possible" in err and err.count("\n") == 1
    assert list((tmp_path / "s" / "runs").iterdir()) == []  # it left a folder holding reproduce.lock alone


def test_val_size_is_required(capsys, tmp_path):
    argv = [a for a in SMALL if a not in ("--val-size", "50")]
    code, _, err = run(capsys, "sweep", *argv, "--eps", "5", "--out", str(tmp_path / "s"))
    assert code == 2 and "--val-size" in err and err.count("\n") == 1


def test_smoke_sweep_writes_outputs_then_reuses_everything(capsys, tmp_path):
    out = tmp_path / "s"
    code, stdout, err = run(capsys, "sweep", *SMALL, "--eps", "5", "20", "--out", str(out))
    assert code == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["status"] == "finished"
    assert list(result["trainings"].values()) == ["trained"] * 3
    assert [r["eps"] for r in result["rows"]] == [5.0, 20.0] and result["baseline"]["eps"] is None
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 3
    for row in [result["baseline"], *result["rows"]]:  # the reported numbers are the runs' own metrics
        metrics = json.loads((out / row["runs"][0]["dir"] / "metrics.json").read_text())
        assert row["val_acc"] == pytest.approx(100 * metrics["val_acc"])
        assert row["test_acc"] == pytest.approx(100 * metrics["test_acc"])
    # the baseline is the base config with method baseline, nothing else changed (eps included)
    baseline = TrainConfig.from_file(out / result["baseline"]["runs"][0]["dir"] / "config.json")
    assert baseline == BASE.replace(method="baseline")
    best = max(result["rows"], key=lambda r: (r["val_acc"], -r["eps"]))
    assert result["chosen_eps"] == best["eps"]
    assert f"**Chosen eps: {best['eps']:g}**" in stdout and stdout == (out / "sweep.md").read_text()
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*")}

    code, _, err = run(capsys, "sweep", *SMALL, "--eps", "5", "20", "--out", str(out))
    again = json.loads((out / "sweep.json").read_text())
    assert code == 0 and list(again["trainings"].values()) == ["reused"] * 3
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*")} == mtimes  # no run was touched
    assert again["rows"] == result["rows"] and again["chosen_eps"] == result["chosen_eps"]


def _fake_run(root, name, cfg, val, test):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "log.jsonl").write_text(json.dumps({"epoch": 1, "val_acc": val, "test_acc": test, "seconds": 1.0}) + "\n")
    (run / "metrics.json").write_text(json.dumps({"val_acc": val, "test_acc": test, "train_seconds": 1.0,
                                                  "device": "cpu"}))


def test_choice_is_by_mean_validation_accuracy_never_test(tmp_path):
    # Hand-made finished runs, in directories named unlike the sweep's own. Per seed (val, test):
    #   eps 5:  (0.50, 0.90), (0.52, 0.92)  mean val 51, mean test 91 <- best test: must not be chosen
    #   eps 10: (0.80, 0.40), (0.40, 0.40)  mean val 60              <- best val on seed 0 alone
    #   eps 20: (0.62, 0.30), (0.64, 0.30)  mean val 63              <- best mean val: chosen
    acc = {5.0: [(0.50, 0.90), (0.52, 0.92)], 10.0: [(0.80, 0.40), (0.40, 0.40)], 20.0: [(0.62, 0.30), (0.64, 0.30)]}
    root = tmp_path / "s" / "runs"
    for seed in (0, 1):
        _fake_run(root, f"b{seed}", BASE.replace(method="baseline", seed=seed), 0.70, 0.95)
        for eps, values in acc.items():
            _fake_run(root, f"x{eps:g}-{seed}", BASE.replace(eps=eps, seed=seed), *values[seed])
    result = sweep(BASE, [5, 10, 20], tmp_path / "s", seeds=2)
    assert list(result["trainings"].values()) == ["reused"] * 8  # nothing trained
    assert result["status"] == "finished" and result["chosen_eps"] == 20.0
    rows = {r["eps"]: r for r in result["rows"]}
    assert rows[20.0]["val_acc"] == pytest.approx(63.0) and rows[20.0]["val_std"] == pytest.approx(2 ** 0.5)
    assert rows[10.0]["val_acc"] == pytest.approx(60.0) and rows[10.0]["val_std"] == pytest.approx(800 ** 0.5)
    assert rows[5.0]["test_acc"] == pytest.approx(91.0)
    assert result["baseline"]["val_acc"] == pytest.approx(70.0)  # the baseline beats every eps: still not chosen
    md = (tmp_path / "s" / "sweep.md").read_text()
    assert "**Chosen eps: 20**" in md and "| **lat** | **20** | 63.0 ± 1.4 | 30.0 ± 0.0 |" in md

    # One seed alone: seed 0's best val is eps 10.
    assert sweep(BASE, [5, 10, 20], tmp_path / "s")["chosen_eps"] == 10.0
    # A seed-1 run missing: eps 20 is incomplete, so only eps 5 and 10 can be chosen, and the status says so.
    for run in root.glob("x20-1"):
        (run / "metrics.json").unlink()
    partial = sweep(BASE, [5, 10, 20], tmp_path / "s", seeds=2, train=False)
    assert partial["status"] == "incomplete" and partial["chosen_eps"] == 10.0
    assert partial["trainings"]["sweep-mlp_tanh-lat-eps20-seed1"] == "not trained (train=False)"
    assert "among the 2 of 3 eps values" in (tmp_path / "s" / "sweep.md").read_text()


def test_a_killed_run_is_resumed_and_ends_as_an_uninterrupted_one(tmp_path, deterministic):
    cfg = BASE.replace(epochs=2)
    reference = train(cfg.replace(eps=5.0), tmp_path / "ref", progress="none")
    # A sweep's lat run killed mid-way long ago (its own directory name, no lock file: not a live lwat reproduce).
    killed = tmp_path / "s" / "runs" / "killed"
    assert train(cfg.replace(eps=5.0), killed, progress="none", stop_after_steps=4)["status"] == "interrupted"
    old = time.time() - 3600
    for p in killed.iterdir():
        os.utime(p, (old, old))
    result = sweep(cfg, [5.0], tmp_path / "s")
    assert result["trainings"]["sweep-mlp_tanh-lat-eps5-seed0"] == "resumed"
    assert result["rows"][0]["runs"][0]["dir"] == "runs/killed"
    resumed = json.loads((killed / "metrics.json").read_text())
    for key in ("val_acc", "test_acc", "train_loss", "train_acc"):
        assert resumed[key] == reference[key], key


def test_an_interrupted_training_stops_the_sweep(monkeypatch, capsys, tmp_path):
    calls = []

    def interrupted(training, root, index, progress="auto"):
        calls.append(training.name)
        return "interrupted", root / "x"

    monkeypatch.setattr(lwat.sweep, "ensure_trained", interrupted)
    code, _, err = run(capsys, "sweep", *SMALL, "--eps", "5", "20", "--out", str(tmp_path / "s"))
    assert code == 130 and "run the same command again" in err
    assert calls == ["sweep-mlp_tanh-baseline-seed0"]  # nothing after the interrupted one
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["status"] == "interrupted"


# The CIFAR-10 sweep of the cpu scale, as a user types it (results/cpu/sweep-vgg16_bn holds its runs).
CIFAR10_SWEEP = ("sweep --model vgg16_bn --width 0.25 --train-subset 10000 --epochs 30 --lr-drop-every 5 --no-flip "
                 "--no-crop --val-size 5000 --dataset folder --data-dir DATA --eps 5 10 20 30 --out OUT")


def test_cifar10_sweep_trains_table4s_cpu_runs_with_a_validation_split(tmp_path):
    """The sweep's trainings are Table 4's cpu-scale baseline config with a 5,000-image validation split, the method
    and eps changed: the same run keys, so the sweep and `lwat reproduce` find each other's runs."""
    from lwat.cli import config_from_args, make_parser
    from lwat.presets import get_preset, resolve_data

    data = tmp_path / "cifar10-jpeg.tar.gz"
    data.write_bytes(b"")  # the key holds the file's stem, not its content
    args = make_parser().parse_args(CIFAR10_SWEEP.replace("DATA", str(data)).replace("OUT", str(tmp_path)).split())
    assert args.eps_list == [5.0, 10.0, 20.0, 30.0]
    base = config_from_args(args)
    table4 = next(t.config for t in get_preset("table4").plan("cpu", 1, resolve_data("cpu", data), "cpu").trainings
                  if t.config.method == "baseline")
    wanted = {run_key(table4.replace(method=m, eps=e, val_size=5000))
              for m, e in [("baseline", 10.0)] + [("lat", e) for e in args.eps_list]}
    made = {run_key(lwat.sweep._training(base, m, e, 0, True).config)
            for m, e in [("baseline", None)] + [("lat", e) for e in args.eps_list]}
    assert made == wanted and len(made) == 1 + len(args.eps_list)
