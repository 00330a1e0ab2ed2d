"""Experiment: compiled lat with inductor's CPU vector min and max reductions without their NaN test.

Inductor's C++ code reduces min and max with torch's `at::vec::minimum` / `maximum`, which propagate a NaN (on
AVX-512: the min or max instruction and three more for the NaN). With `plain` as the first argument, this script
has inductor emit `at::vec::clamp_max` / `clamp_min` there instead (the bare instruction, so a NaN may be lost);
with `nan` it changes nothing. Then it runs benchmarks/step_overhead.py with the other arguments. In ResNet-20's
compiled graphs these reductions are lat's per-channel range and, in every model, the loss's max over a row of 10
logits, so the two variants time what the NaN test costs compiled lat. A timing probe, not lat: a NaN gradient
would no longer make a NaN range.

    python benchmarks/experiments/plain_minmax.py plain --models resnet20 --modes compiled --amp off --steps 40
    python benchmarks/experiments/plain_minmax.py nan --models resnet20 --modes compiled --amp off --steps 40

Private API (torch 2.13.0): `torch._inductor.codegen.cpp.CppVecKernel.reduction_combine_vec`.
"""

import runpy
import sys
from pathlib import Path

import torch
from torch._inductor.codegen import cpp

BENCHMARKS = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "nan")


def plain_min_max(combine):
    """`CppVecKernel.reduction_combine_vec` with min and max (of any but bool values) as the bare vector instruction."""
    def plain(self, reduction_type, var, next_value, helper_val=None, index=None, horizontal_reduction=None,
              src_dtype=torch.float32):
        if reduction_type in ("min", "max") and not self.tail_size and src_dtype != torch.bool:
            return f"at::vec::{'clamp_min' if reduction_type == 'max' else 'clamp_max'}({next_value}, {var})"
        return combine(self, reduction_type, var, next_value, helper_val, index, horizontal_reduction, src_dtype)
    return plain


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: plain_minmax.py {{{','.join(VARIANTS)}}} [step_overhead.py arguments]")
    if sys.argv.pop(1) == "plain":
        cpp.CppVecKernel.reduction_combine_vec = plain_min_max(cpp.CppVecKernel.reduction_combine_vec)
    sys.path.insert(0, str(BENCHMARKS))
    sys.argv[0] = str(BENCHMARKS / "step_overhead.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
