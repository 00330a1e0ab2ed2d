"""A/B of a refactor: lat with lwat/perturb.py as of an older commit (default a5ac3cb, before it was split into
perturb.py, cache.py and _classes.py) against the working tree's, side by side in one process with the plain model and
an A/A copy (ResNet-20, batch 128, eager, CPU). Run from the repository root:

    python benchmarks/experiments/ab_perturb.py 30 [COMMIT]

The old file must import nothing else of lwat on the eager aten path (true of a5ac3cb's)."""
import copy, importlib.util, pathlib, statistics, subprocess, sys, tempfile
import torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
import lwat
from lwat.models import build_model
from race import race
commit = sys.argv[2] if len(sys.argv) > 2 else "a5ac3cb"
path = pathlib.Path(tempfile.mkdtemp()) / "old_perturb.py"
path.write_text(subprocess.run(["git", "show", f"{commit}:lwat/perturb.py"], capture_output=True, text=True,
                               check=True).stdout)
spec = importlib.util.spec_from_file_location("old_perturb", path)
old = importlib.util.module_from_spec(spec); sys.modules["old_perturb"] = old; spec.loader.exec_module(old)
torch.manual_seed(0)
base = build_model("resnet20", 10)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
models = {"plain": base, "plain-A/A": copy.deepcopy(base), "lat-old": copy.deepcopy(base), "lat-new": copy.deepcopy(base)}
old.attach(models["lat-old"], 10.0); lwat.attach(models["lat-new"], 10.0)
def step(m, opt):
    def f():
        opt.zero_grad(set_to_none=True); F.cross_entropy(m(x), y).backward(); opt.step()
    return f
steps = {k: step(m.train(), torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)) for k, m in models.items()}
t = race(steps, rounds=int(sys.argv[1]), warmup=3)
med = {k: statistics.median(v) for k, v in t.items()}
print({k: round(v * 1000, 1) for k, v in med.items()})
print("lat-old/plain %.3f  lat-new/plain %.3f  new/old %.3f  A/A %.3f" % (med["lat-old"] / med["plain"], med["lat-new"] / med["plain"], med["lat-new"] / med["lat-old"], med["plain-A/A"] / med["plain"]))
