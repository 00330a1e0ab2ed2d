"""lwat: efficient layerwise adversarial training (Sankaranarayanan et al., AAAI 2018) for PyTorch."""

from lwat._compile import compile_options
from lwat.perturb import Handle, attach, default_points, select_points

__all__ = ["Handle", "attach", "compile_options", "default_points", "select_points"]
__version__ = "0.1.0"
