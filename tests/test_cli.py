"""Tests of the `lwat` command: help matches the config, bad input is one line and exit 2, eval and demo run."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lwat.analysis import ANALYSES
from lwat.cli import main, make_parser, registry_names
from lwat.config import TrainConfig


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_help_lists_every_config_field_with_default(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        known = f": {registry_names()[f.name]}" if f.name in registry_names() else ""
        assert f"{f.metadata['help']}{known} (default: {f.default})" in text, f.name
    for flag in ("--out", "--resume", "--config"):
        assert flag in text


def test_train_help_names_every_model_and_method(capsys):
    # --model and --method take a registry's names: the help lists them, so a user need not guess
    from lwat.methods import METHODS
    from lwat.models import MODELS

    with pytest.raises(SystemExit):
        make_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("options:"):]  # not the usage lines
    model_help = text[text.index("--model MODEL"):text.index("--width WIDTH")]
    method_help = text[text.index("--method METHOD"):text.index("--dataset DATASET")]
    assert all(name in model_help for name in MODELS), model_help
    assert all(f"{name} ({m.help})" in method_help for name, m in METHODS.items()), method_help


SMALL = ["--model", "mlp_tanh", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
         "--progress", "none"]


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "mnist"], "unknown data set 'mnist'"),
    (["--model", "vgg19"], "unknown model 'vgg19'"),
    (["--method", "pgd"], "unknown method 'pgd'"),
    (["--eps", "-1"], "eps must be >= 0"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "--download on the command line"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--eps", "inf"], "eps must be a finite number, got inf"),
    (["--scale", "max"], "unknown scale 'max'"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--mixup", "1", "--cutmix", "1"], "mixup and cutmix: choose one"),
    (["--method", "fgsm", "--sam", "0.05"], "sam: combines with the one-pass methods"),
    (["--sam", "0.05", "--amp", "fp16"], "sam: not with --amp fp16"),
    (["--sam-adaptive"], "sam_adaptive needs a SAM rho"),
    (["--mix-prob", "0.5"], "mix_prob needs mixup or cutmix"),
    (["--cutmix", "1", "--mix-prob", "0"], "mix_prob 0 mixes no batch"),
    (["--cutout", "64"], "cutout 64 blanks every 32x32 image wholly"),
    (["--label-smoothing", "1"], "label_smoothing must be in [0, 1), got 1.0"),
    (["--ema", "-0.5"], "ema must be in [0, 1), got -0.5"),
])
def test_bad_train_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    code, out, err = run(capsys, "train", *SMALL, "--out", str(tmp_path / "r"), *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_kernels_that_cannot_compile_are_one_line_exit_2(capsys, tmp_path, monkeypatch):
    """--kernels fused on a machine where torch.compile fails (no C++ compiler): one line, no traceback (a model
    with BatchNorm points, whose kernels are the BatchNorm's)."""
    import torch._dynamo.exc
    from lwat import _fused

    def no_compiler(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(no_compiler, RuntimeError("No working C++ compiler found"), None)
    monkeypatch.setattr(_fused, "_kernels", lambda shape: (no_compiler, no_compiler))
    kernels = "fused"
    code, out, err = run(capsys, "train", *SMALL, "--model", "vgg16_bn", "--width", "0.125", "--out",
                         str(tmp_path / "r"), "--kernels", kernels)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"kernels='{kernels}' cannot compile its kernels here (RuntimeError: No working C++ compiler found)" in err


@pytest.mark.parametrize("content,message", [
    ({"epochs": 1, "learning_rate": 0.1}, "unknown config key(s): learning_rate"),
    ({"epochs": "ten"}, "epochs: expected int, got 'ten'"),
    ([1, 2], "one JSON object"),
])
def test_bad_config_file(content, message, capsys, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    code, _, err = run(capsys, "train", "--config", str(path), "--out", str(tmp_path / "r"))
    assert code == 2 and message in err and "Traceback" not in err


def test_config_file_then_flags_and_resume_rules(capsys, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "mlp_tanh", "dataset": "synthetic", "epochs": 3, "method": "baseline"}))
    code, out, err = run(capsys, "train", "--config", str(path), "--epochs", "1", "--batch-size", "32",
                         "--device", "cpu", "--progress", "none", "--out", str(tmp_path / "r"))
    assert code == 0, err
    saved = TrainConfig.from_file(tmp_path / "r" / "config.json")
    assert (saved.epochs, saved.method, saved.model) == (1, "baseline", "mlp_tanh")  # flag beats file
    assert json.loads(out)["epochs"] == 1
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "r"), "--epochs", "5")
    assert code == 2 and "only --device" in err
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "nope"))
    assert code == 2 and "not a run directory" in err


def test_eval_prints_table_and_writes_json(capsys, tmp_path):
    assert run(capsys, "train", *SMALL, "--out", str(tmp_path / "r"))[0] == 0
    code, out, err = run(capsys, "eval", str(tmp_path / "r"), "--eps", "0", "0.1", "--device", "cpu")
    assert code == 0, err
    result = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert set(result["accuracy"]) == {"0", "0.1"}
    assert f"{100 * result['accuracy']['0']:6.2f}%" in out
    code, _, err = run(capsys, "eval", str(tmp_path / "missing"))
    assert code == 2 and "no run directory or checkpoint" in err
    code, _, err = run(capsys, "eval", str(tmp_path / "r"), "--eps", "0", "0.1", "0.1", "--device", "cpu")
    assert code == 2 and "eps 0.1 is given more than once" in err and err.count("\n") == 1, err
    assert json.loads((tmp_path / "r" / "eval.json").read_text()) == result  # unchanged


@pytest.mark.parametrize("damage", ["cut", "config"])
def test_damaged_or_foreign_checkpoint_is_one_line_exit_2(damage, capsys, tmp_path):
    run_dir = tmp_path / "r"
    assert run(capsys, "train", *SMALL, "--out", str(run_dir))[0] == 0
    ckpt = run_dir / "checkpoint.pt"
    if damage == "cut":  # a checkpoint cut short (its first 5,000 bytes)
        ckpt.write_bytes(ckpt.read_bytes()[:5000])
    target = run_dir if damage == "cut" else run_dir / "config.json"  # config.json: a file that is no checkpoint
    code, _, err = run(capsys, "eval", str(target), "--eps", "0", "--device", "cpu")
    named = ckpt if damage == "cut" else target
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lwat: error: {named}: not a readable lwat checkpoint"), err
    assert "weights_only" not in err, err  # torch's advice to load without weights_only is not for an lwat user


def test_demo_end_to_end(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--seeds", "0", "--out", str(tmp_path / "none"))
    assert code == 2 and "seeds and epochs must be >= 1, got seeds 0" in err and not (tmp_path / "none").exists()
    code, out, err = run(capsys, "demo", "--epochs", "2", "--seeds", "1", "--out", str(tmp_path), "--device", "cpu")
    assert code == 0, err
    assert "| baseline |" in out and "| lat |" in out
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert out.strip().endswith((tmp_path / "demo.md").read_text().strip())  # after per-epoch lines
    # The per-seed gain line is lat's clean accuracy minus the baseline's, as the table rows print them.
    clean = {m: float(next(l for l in out.splitlines() if l.startswith(f"| {m} |")).split("|")[2])
             for m in ("baseline", "lat")}
    gain = float(out.split("lat - baseline per seed (points): clean ")[1].split(";")[0])
    assert abs(gain - (clean["lat"] - clean["baseline"])) < 0.11, (gain, clean)
    # Fewer epochs in the same folder: new runs of that length, not the 2-epoch ones labelled "1 epochs".
    code, out, err = run(capsys, "demo", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path), "--device", "cpu")
    assert code == 0, err
    one_epoch = {json.loads(p.read_text())["method"]: p.parent for p in tmp_path.glob("*/config.json")
                 if json.loads(p.read_text())["epochs"] == 1}
    assert set(one_epoch) == {"baseline", "lat"} and "1 epochs" in out
    for method, run_dir in one_epoch.items():
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        row = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
        assert len(log) == 1 and row.endswith(f"| {log[0]['images_per_s']:.0f} |"), (row, log)


def test_analyze_robustness_right_after_train_names_lwat_eval(capsys, tmp_path):
    """robustness reads the runs' eval.json, which `lwat eval` writes: right after `lwat train` the command says so in
    one line naming `lwat eval RUN` (it said "not evaluated yet" and nothing of what to do), and runs after it."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run(capsys, "train", *SMALL, "--out", one)[0] == 0
    shutil.copytree(one, two)  # a second trained run, not evaluated either
    code, out, err = run(capsys, "analyze", "robustness", one, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{one}: not evaluated yet" in err and f"run `lwat eval {one}` first" in err, err
    code, out, err = run(capsys, "analyze", "robustness", one, two, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and f"{one}, {two}: not evaluated yet" in err, err
    assert "run `lwat eval RUN` on each first" in err, err
    assert not (tmp_path / "one" / "analysis").exists()
    assert run(capsys, "eval", one, "--eps", "0", "0.1", "--device", "cpu")[0] == 0
    code, out, err = run(capsys, "analyze", "robustness", one, two, "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and f": {two}: not evaluated yet" in err, err  # only the one lacking
    assert f"run `lwat eval {two}` first" in err, err
    code, out, err = run(capsys, "analyze", "robustness", one, "--device", "cpu")
    assert code == 0, err
    rows = json.loads((tmp_path / "one" / "analysis" / "robustness.json").read_text())["rows"]
    assert {r["eps"] for r in rows} == {0.0, 0.1}


def test_analyze_every_analysis_on_tiny_runs(capsys, tmp_path):
    runs = {}
    for method, extra in (("baseline", []), ("lat", []), ("fgsm", []), ("lat", ["--depth", "1"])):
        name = method + "".join(extra)
        code, _, err = run(capsys, "train", *SMALL, "--method", method, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        runs[name] = str(tmp_path / name)
    base, lat, fgsm, shallow = runs["baseline"], runs["lat"], runs["fgsm"], runs["lat--depth1"]
    calls = {
        "strength": [base, "--eps", "0", "0.1"],
        "tsne": [base, "--eps", "0", "1", "--limit", "128"],
        "jacobian": [base, lat, fgsm, "--limit", "8"],
        "transfer": [base, lat, fgsm, "--target", base, "--eps", "0", "0.05"],
        "depth": [shallow, lat, "--baseline", base],
        "curves": [base, lat],
        "robustness": [base, lat, "--eps", "0", "0.1"],
    }
    assert set(calls) == set(ANALYSES)  # every registered analysis, through the command line
    for r in (base, lat):  # robustness reads eval.json
        assert run(capsys, "eval", r, "--eps", "0", "0.05", "0.1", "--device", "cpu")[0] == 0
    for name, argv in calls.items():
        code, out, err = run(capsys, "analyze", name, *argv, "--out", str(tmp_path / "a"), "--device", "cpu")
        assert code == 0, (name, err)
        for ext in ("png", "csv", "json"):
            assert (tmp_path / "a" / f"{name}.{ext}").stat().st_size > 0
    drawn = {(r["label"], r["eps"]): r["mean"] for r in json.loads((tmp_path / "a" / "robustness.json").read_text())["rows"]}
    evals = {m: json.loads((tmp_path / m / "eval.json").read_text())["accuracy"] for m in ("baseline", "lat")}
    assert drawn == {(m, e): evals[m][f"{e:g}"] for m in evals for e in (0.0, 0.1)}
    code, _, err = run(capsys, "analyze", "robustness", fgsm, "--device", "cpu")  # never evaluated
    assert code == 2 and "not evaluated yet" in err and err.count("\n") == 1, err
    rows = json.loads((tmp_path / "a" / "strength.json").read_text())["rows"]
    clean = [r["accuracy"] for r in rows if r["eps"] == 0]
    assert len(set(clean)) == 1  # every attack at eps 0 is the clean accuracy
    code, _, err = run(capsys, "analyze", "strength", base, lat)
    assert code == 2 and "takes one run" in err
    for argv, message in ((["tsne", base, "--classes", "0", "0"], "tsne: give two different classes, got (0, 0)"),
                          (["curves", base, base], f"analyze curves: run {base} is given more than once"),
                          (["depth", lat, "--out", str(tmp_path / "afile" / "a")], "Not a directory")):
        (tmp_path / "afile").write_text("")
        code, _, err = run(capsys, "analyze", *argv, "--device", "cpu")
        assert code == 2 and message in err and err.count("\n") == 1, err
    for limit in ("0", "-5"):  # 0 divided by zero; -5 took all but the last five images
        code, _, err = run(capsys, "analyze", "strength", base, "--limit", limit, "--device", "cpu")
        assert code == 2 and f"limit must be >= 1 (the first LIMIT test images), got {limit}" in err, err


def test_output_piped_into_a_reader_that_stops_is_quiet():
    """`lwat presets | head -3`: the reader goes away, and lwat stops without an error line (as cat does)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "lwat", "presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before lwat writes: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err  # 128 + SIGPIPE, what a shell shows for `cat | head`


def test_interrupted_demo_says_how_to_continue(capsys, tmp_path, monkeypatch):
    # Ctrl-C during a demo training: its checkpoint is kept and the same command resumes it, as reproduce and sweep say
    import lwat.demo

    monkeypatch.setattr(lwat.demo, "train", lambda cfg, run, resume: {"status": "interrupted"})
    code, out, err = run(capsys, "demo", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path), "--device", "cpu")
    assert code == 130 and out == "" and err == "interrupted: run the same command again to continue\n", err


def test_demo_help_states_its_default_workload_and_no_unmeasured_time(capsys):
    # The command list's line for demo says what the defaults train (no time that no run measured)
    parser = make_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    seeds, epochs = demo.get_default("seeds"), demo.get_default("epochs")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    line = " ".join(capsys.readouterr().out.split())
    line = line[line.index("demo "):line.index(" analyze ")]
    assert f"{seeds} seeds" in line and f"{epochs} epochs" in line and "minute" not in line, line
