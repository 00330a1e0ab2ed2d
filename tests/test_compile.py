"""Tests of lwat under torch.compile without surprises: one graph break, no recompile warning beside a plain
copy, nothing of inductor or dynamo imported or changed unless asked for."""

import copy
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwat
from reference import resnet20_layout


class Block(nn.Module):
    """One class for every block; the stride and the shortcut differ (torchvision's BasicBlock, in small)."""

    def __init__(self, c_in, c, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c:
            self.short = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(out + self.short(x))


def resnet20(width=2):
    """ResNet-20's layout (3 stages of 3 blocks, strides 1, 2, 2), tiny widths."""
    return resnet20_layout(Block, width)


@pytest.mark.compile
def test_plain_and_attached_resnet_compiled_side_by_side_train_quietly_in_one_graph(caplog):
    """Issue 33: a plain and an attached copy, each `model.compile()`d, at dynamo's default limits: no recompile
    warning; the attached model has one graph break (sizing the cache, first step) and the plain one none; the
    cache is refreshed every step and equals an eager attached twin's. Before the fix the meta pass that sizes
    the cache re-entered the compiled `model.__call__`, so dynamo traced it point by point: 17 graph breaks and
    Block.forward recompiled per stride up to the limit."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = resnet20()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    plain, attached, eager = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    handle, eager_handle = lwat.attach(attached, 10.0), lwat.attach(eager, 10.0)
    plain.compile(backend="aot_eager")
    attached.compile(backend="aot_eager")
    opts = {m: torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, attached, eager)}
    breaks = {}
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for name, model in (("attached", attached), ("plain", plain)):  # attached first: its code compiles first
            counters.clear()
            scales = []
            for x, y in data:
                opts[model].zero_grad()
                F.cross_entropy(model(x), y).backward()
                opts[model].step()
                if model is attached:
                    opts[eager].zero_grad()
                    F.cross_entropy(eager(x), y).backward()
                    opts[eager].step()
                    scales.append(handle.state_dict()["1"]["scale"])
                    for p, v in handle.state_dict().items():  # the compiled backward refreshed the cache
                        assert torch.equal(v["signs"], eager_handle.state_dict()[p]["signs"]), p
                        torch.testing.assert_close(v["scale"], eager_handle.state_dict()[p]["scale"])
            breaks[name] = sum(counters["graph_break"].values())
            if model is attached:
                assert len({float(s) for s in scales}) == 3 and all(s > 0 for s in scales)
    assert not [r.getMessage() for r in caplog.records if "recompile" in r.getMessage()]
    assert breaks == {"attached": 1, "plain": 0}, breaks
    torch._dynamo.reset()


def test_import_lwat_loads_nothing_of_inductor_or_dynamo():
    """`import lwat` (and attaching, training eagerly) imports no torch._inductor or torch._dynamo module: the
    speed modules are imported only when their option is used."""
    code = ("import sys, torch, lwat\n"
            "from torch import nn\n"
            "m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))\n"
            "lwat.attach(m, 10.0)\n"
            "for _ in range(2): m(torch.randn(5, 3)).sum().backward()\n"
            "speed = ('torch._inductor', 'torch._dynamo', 'lwat._compile', 'lwat._fused', 'lwat._inductor')\n"
            "print(sorted(k for k in sys.modules if k.startswith(speed)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fusion_rule_leaves_inductor_s_own_rule_in_a_fresh_thread():
    """The usual first use: nothing asked inductor for its heuristics before the block (a fresh process, or the
    first compile of a thread). After the block the thread has inductor's own, not lwat's."""
    code = ("import lwat\nfrom torch._inductor import config\nfrom torch._inductor.virtualized import V\n"
            "with lwat.fusion_rule():\n    inside = type(V.choices).__name__\n"
            "print(inside, type(V.choices).__name__, config.inductor_choices_class)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["_FusionChoices", "InductorChoices", "None"], out


def test_fusion_rule_changes_inductor_only_inside_its_block():
    """lwat.fusion_rule() sets lwat's heuristics and option for its block and gives inductor's own back after it,
    also when the block raises."""
    from torch._inductor import config
    from torch._inductor.virtualized import V
    before, option = V.choices, config.inductor_choices_class
    with lwat.fusion_rule():
        assert type(V.choices).__name__ == "_FusionChoices" and config.inductor_choices_class is not None
    assert V.choices is before and config.inductor_choices_class is option
    with pytest.raises(KeyError), lwat.fusion_rule():
        raise KeyError
    assert V.choices is before and config.inductor_choices_class is option
