"""Probe (issue 33): does a plain compiled copy beside an attached one run compiled? Per step: compiled regions, and
forward convolutions inside one. python benchmarks/experiments/side_by_side_regions.py aot_eager"""
# Old vs new lwat: a plain and an attached copy of one ResNet-20-like net (shared Block class), each model.compile()d
# (aot_eager), attached first; then how each compiled model's steps run: compiled regions per step and time.
import sys, time, copy, torch, logging
from torch import nn
import torch.nn.functional as F
sys.path.insert(0, "tests")  # run from the repository root
from test_compile import resnet20
import lwat
torch.manual_seed(0)
torch.set_num_threads(2)
net = resnet20(width=8)
plain, att = copy.deepcopy(net), copy.deepcopy(net)
lwat.attach(att, 10.0)
x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
models = {"lat": att, "plain": plain}
eager = {"plain eager": copy.deepcopy(net)}
for m in models.values(): m.compile(backend=sys.argv[1])
opts = {n: torch.optim.SGD(m.parameters(), lr=0.01) for n, m in {**models, **eager}.items()}
def step(n, m):
    opts[n].zero_grad(); F.cross_entropy(m(x), y).backward(); opts[n].step()
for n, m in models.items():
    for _ in range(3): step(n, m)
times = {n: [] for n in {**models, **eager}}
for r in range(8):
    for n, m in {**models, **eager}.items():
        t0 = time.perf_counter(); step(n, m); times[n].append(1e3 * (time.perf_counter() - t0))
for n, m in {**models, **eager}.items():
    with torch.profiler.profile() as prof:
        step(n, m)
    regions = [e for e in prof.events() if e.name.startswith("Torch-Compiled Region")]
    convs = [e for e in prof.events() if e.name == "aten::convolution"]
    inside = sum(any(r.time_range.start <= c.time_range.start and c.time_range.end <= r.time_range.end for r in regions) for c in convs)
    print(f"{n}: median {sorted(times[n])[4]:.0f} ms; compiled regions/step {len(regions)}; forward convs inside a compiled region {inside}/{len(convs)}")
