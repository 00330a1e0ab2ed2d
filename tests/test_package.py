"""Tests of what the package installs: `import lwat` is light and needs torch alone; the lwat command without the
experiments extra says in one line how to install it."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lwat.presets
from lwat.cli import EXPERIMENTS, main

ROOT = Path(__file__).resolve().parent.parent
# What `import lwat` must not import: the experiment platform's packages, and no private torch module.
HEAVY = ("sklearn", "matplotlib", "PIL", "tqdm", "scipy", "torch._inductor")
# A fresh interpreter where the experiments extra is not installed: an import of one of its packages fails as it
# would there (ModuleNotFoundError), while torch's own optional uses of them (torch.hub's tqdm) fall back.
WITHOUT_EXTRA = f"import sys\nfor name in {sorted(EXPERIMENTS)!r}:\n    sys.modules[name] = None\n"


def fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def imported(module: str) -> list[str]:
    """The modules of HEAVY in sys.modules after `import module` in a fresh interpreter."""
    proc = fresh_python(f"import {module}, sys; print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))")
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def test_import_lwat_imports_no_platform_package_and_no_private_torch_module():
    # torch itself imports tqdm where it is installed (torch.hub's progress bar); lwat imports torch with it hidden
    assert "tqdm" in imported("torch")
    assert imported("lwat") == []
    # ... and hub's bar, drawn by a download, is still tqdm's
    proc = fresh_python("import lwat, torch, sys; bar = torch.hub.tqdm(total=3, disable=True); "
                        "print(type(bar).__module__, 'tqdm' in sys.modules)")
    assert proc.returncode == 0 and proc.stdout.split() == ["tqdm.std", "True"], proc.stderr


CORE_STEP = WITHOUT_EXTRA + """
import torch
from torch import nn
import lwat
from lwat.integrations._shared import Attachment

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
handle = lwat.attach(model, 10.0)
with handle.paused():
    plain = model(x)
first = model(x)  # no cache yet: the plain output
nn.functional.cross_entropy(first, y).backward()  # Eq. 5: the cache
second = model(x)  # Eq. 6: perturbed by the previous batch's signs
handle.detach()
print(handle.points, torch.equal(first, plain), torch.equal(second, plain), torch.equal(model(x), plain),
      type(model[1]) is nn.BatchNorm1d)
"""


def test_attach_trains_where_the_experiments_extra_is_not_installed():
    proc = fresh_python(CORE_STEP)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["['1']", "True", "False", "True", "True"], proc.stdout


def test_every_missing_package_of_the_extra_is_one_line_naming_the_install(monkeypatch, capsys):
    """A command that imports a package of the experiments extra where it is not installed: one line naming the
    package and `pip install "lwat[experiments]"`, exit 2, no traceback."""
    def needs(name):
        def format_presets():
            __import__(name)
        return format_presets

    for name, package in EXPERIMENTS.items():
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, name, None)  # as if not installed
            patch.setattr(lwat.presets, "format_presets", needs(name))
            code = main(["presets"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert err == (f"lwat: error: lwat presets needs the experiment platform's packages ({package} is not "
                       'installed): pip install "lwat[experiments]"\n'), err


def test_a_missing_module_outside_the_extra_is_not_hidden(monkeypatch):
    # A module that no extra installs is a bug to see, with its traceback, not an install hint.
    def broken():
        import lwat_no_such_module  # noqa: F401
    monkeypatch.setattr(lwat.presets, "format_presets", broken)
    with pytest.raises(ModuleNotFoundError, match="lwat_no_such_module"):
        main(["presets"])


@pytest.mark.parametrize("blocked,data,package", [
    ("sklearn", ["--dataset", "digits"], "scikit-learn"),  # lwat.data imports scikit-learn when it loads digits
    ("PIL", ["--dataset", "folder"], "pillow"),  # and Pillow when it decodes an image
])
def test_a_training_whose_data_needs_a_missing_package_is_one_line(blocked, data, package, monkeypatch, capsys,
                                                                   tmp_path):
    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # its submodules too: an import finds them there first
    monkeypatch.setitem(sys.modules, blocked, None)
    if "folder" in data:
        for split in ("train", "test"):
            for label in ("cat", "dog"):
                (tmp_path / "images" / split / label).mkdir(parents=True)
                (tmp_path / "images" / split / label / "0.png").write_bytes(b"\x89PNG not decoded")
        data = [*data, "--data-dir", str(tmp_path / "images")]
    code = main(["train", "--model", "mlp_tanh", "--epochs", "1", "--device", "cpu", "--progress", "none",
                 "--out", str(tmp_path / "run"), *data])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"({package} is not installed): pip install \"lwat[experiments]\"" in err, err


def test_the_command_without_the_extra_in_a_fresh_interpreter(tmp_path):
    """`python -m lwat` where the extra is not installed: help still lists the commands and train's config flags;
    a command is one line and exit 2 (no import of the command line's own modules needs the extra)."""
    run = WITHOUT_EXTRA + "import runpy\nsys.argv = ['lwat', *{argv!r}]\nrunpy.run_module('lwat', run_name='__main__')"
    proc = fresh_python(run.format(argv=["train", "--help"]))
    assert proc.returncode == 0 and "--batch-size" in proc.stdout and "--eps" in proc.stdout, proc.stderr
    out = tmp_path / "run"
    proc = fresh_python(run.format(argv=["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(out)]))
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and 'pip install "lwat[experiments]"' in proc.stderr, proc.stderr
    assert not out.exists()


def test_presets_and_help_need_no_extra():
    """Listing the presets reads lwat/paper/ alone (torch and the standard library): it runs where the extra is not
    installed, as the help does; the commands that need the extra still refuse in one line."""
    run = WITHOUT_EXTRA + "import runpy\nsys.argv = ['lwat', *{argv!r}]\nrunpy.run_module('lwat', run_name='__main__')"
    proc = fresh_python(run.format(argv=["presets"]))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines()[0].split()[:4] == ["preset", "smoke", "cpu", "paper"], proc.stdout
    assert "table4" in proc.stdout and "regularizers" in proc.stdout, proc.stdout
    proc = fresh_python(run.format(argv=["--help"]))
    assert proc.returncode == 0 and "presets" in proc.stdout, proc.stderr
    for argv in (["eval", "runs/none"], ["demo"], ["reproduce", "table4"], ["analyze", "curves", "runs/none"]):
        proc = fresh_python(run.format(argv=argv))
        assert proc.returncode == 2 and proc.stdout == "", (argv, proc.stderr)
        assert proc.stderr.count("\n") == 1 and 'pip install "lwat[experiments]"' in proc.stderr, (argv, proc.stderr)


def test_readme_loop_example_runs_as_copied_where_the_extra_is_not_installed():
    """The README's first code block, pasted into a file by a user with the core install: it runs and perturbs."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it in your own training loop"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    proc = fresh_python(WITHOUT_EXTRA + "import torch; torch.set_num_threads(1)\n" + code
                        + "print(sorted(lwat.handle_of(model).state_dict()))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] != "[]", proc.stdout  # the backward pass left a cache


@pytest.mark.parametrize("extra,framework", [("lightning", "lightning"), ("huggingface", "transformers")])
def test_an_integration_without_its_framework_names_its_extra(extra, framework):
    # A core install that imports a callback: the error says which extra brings the framework
    proc = fresh_python(f"import sys\nsys.modules[{framework!r}] = None\n"
                        f"try:\n    import lwat.integrations.{extra}\n"
                        f"except ModuleNotFoundError as e:\n    print(e.name, '|', e)\n")
    assert proc.returncode == 0, proc.stderr
    name, _, message = proc.stdout.strip().partition(" | ")
    assert name.partition(".")[0] == framework and message.endswith(f'pip install "lwat[{extra}]"'), proc.stdout
